"""GET /: one small page to try the API. It uses only GET /v1/models and POST /v1/generate,
with the API key the user types (kept in the tab's sessionStorage) when the server asks for
one. On a step-engine server it asks for a stream (`"stream": true`): a progress bar follows
each stage's steps and the images show the model's current x_0 predictions until the result
comes. Kept as a string in a module so that it ships with the package's Python files."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ADM: guided diffusion</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 15px system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }
  form { display: flex; flex-wrap: wrap; gap: .8em 1.5em; align-items: end; }
  label { display: flex; flex-direction: column; gap: .2em; font-size: 13px; color: #555; }
  input, select, button { font: inherit; padding: .3em .5em; }
  button { cursor: pointer; }
  #out { display: flex; gap: 2em; margin-top: 1.5em; }
  figure { margin: 0; }
  figure img { width: 256px; height: 256px; image-rendering: pixelated; background: #eee;
               display: block; }
  figcaption { font-size: 13px; color: #555; margin-top: .3em; }
  #status { margin-top: 1em; min-height: 1.3em; }
  #bar { width: 100%; max-width: 540px; margin-top: .8em; }
  .error { color: #b00; }
</style>
</head>
<body data-state="loading">
<h1>Guided diffusion</h1>
<form id="form">
  <label>Class <select id="cls" required></select></label>
  <label>Guidance scale <input id="scale" type="number" min="0" step="0.5"></label>
  <label title="guide only where the noise level sigma is in (from, to]; blank: every step">Guided
    for sigma in (<input id="glo" type="number" min="0" step="any" placeholder="0" size="5">,
    <input id="ghi" type="number" min="0" step="any" placeholder="any" size="5">]</label>
  <label title="fast: the fastest sampling preset that matched DDIM-25's FID">Quality
    <select id="quality"><option value="default">default</option>
      <option value="fast">fast</option></select></label>
  <label>Seed <input id="seed" type="number" min="0" step="1" placeholder="random"></label>
  <label>API key <input id="key" type="password" autocomplete="off"
                        placeholder="if the server asks"></label>
  <button id="go" type="submit">Generate</button>
</form>
<progress id="bar" max="1" value="0"></progress>
<div id="status"></div>
<div id="out">
  <figure><img id="base" alt="base sample"><figcaption id="base-cap">base</figcaption></figure>
  <figure><img id="up" alt="upsampled"><figcaption id="up-cap">upsampled</figcaption></figure>
</div>
<script>
const root = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
let models = null;

function headers() {
  const key = $("key").value || sessionStorage.getItem("adm-key") || "";
  const h = {"Content-Type": "application/json"};
  if (key) { h["Authorization"] = "Bearer " + key; sessionStorage.setItem("adm-key", key); }
  return h;
}

function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function detail(resp) {
  try { return (await resp.json()).detail; } catch (e) { return resp.statusText; }
}

async function loadModels() {
  const resp = await fetch(root + "v1/models", {headers: headers()});
  if (!resp.ok) {
    status(resp.status === 401 ? "This server needs an API key: enter it, then Generate."
                               : "GET /v1/models: " + await detail(resp), true);
    document.body.dataset.state = "needs-key";
    return false;
  }
  models = await resp.json();
  const select = $("cls");
  select.innerHTML = "";
  const names = models.class_names || [...Array(models.num_classes).keys()].map(String);
  names.forEach((name, i) => {
    const opt = document.createElement("option");
    opt.value = models.class_names ? name : String(i);
    opt.textContent = models.class_names ? name : "class " + i;
    select.appendChild(opt);
  });
  $("scale").value = models.defaults.guidance_scale;
  $("scale").max = models.limits.max_guidance_scale;
  $("scale").disabled = models.classifier === null;
  $("glo").disabled = $("ghi").disabled = models.classifier === null;
  $("up").parentElement.style.display = models.upsampler ? "" : "none";
  document.body.dataset.state = "ready";
  status("Ready: " + models.base.image_size + " px base" +
         (models.upsampler ? ", upsampled to " + models.upsampler.image_size + " px." : "."));
  return true;
}

function png(b64) { return "data:image/png;base64," + b64; }

// The events of a text/event-stream body (fetch, since EventSource cannot POST): each is an
// `event:` line and a `data:` line of JSON, ended by a blank line.
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message", data = "";
      for (const line of block.split("\\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) yield [kind, JSON.parse(data)];
    }
  }
}

// Progress over both stages: the base's steps, then the upsampler's.
function progress(stage, step, steps) {
  const stages = models.upsampler ? 2 : 1;
  const done = (stage === "upsample" ? 1 : 0) + step / steps;
  $("bar").value = done / stages;
  status((stage === "upsample" ? "Upsampling" : "Sampling") + ": step " + step + " of " +
         steps + "...");
}

async function streamed(resp) {
  let previews = 0;
  for await (const [kind, data] of events(resp)) {
    if (kind === "queued") status("Queued: " + data.position + " ahead...");
    else if (kind === "progress") progress(data.stage, data.step, data.steps);
    else if (kind === "preview") {
      previews += 1;
      document.body.dataset.previews = String(previews);
      await show($(data.stage === "upsample" ? "up" : "base"), png(data.images[0]));
    } else if (kind === "error") throw new Error(data.status + ": " + data.detail);
    else if (kind === "result") return data;
  }
  throw new Error("the stream ended without a result");
}

async function generate(event) {
  event.preventDefault();
  if (!models && !(await loadModels())) return;
  const stream = models.scheduling === "step";
  const body = {response: "json", upsample: models.upsampler !== null,
                guidance_scale: Number($("scale").value || 0)};
  if (models.class_names) body.class_name = $("cls").value;
  else body.class_id = Number($("cls").value);
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("quality").value !== "default") body.quality = $("quality").value;
  if (body.guidance_scale > 0 && ($("glo").value !== "" || $("ghi").value !== ""))
    body.guidance_interval = [Number($("glo").value || 0),
                              $("ghi").value === "" ? 1e9 : Number($("ghi").value)];
  if (stream) {  // about four previews of the base stage, if the server allows them
    body.stream = true;
    const previews = Math.min(models.limits.max_previews, 4);
    if (previews > 0) body.preview_every = Math.ceil(models.defaults.steps / previews);
  }
  document.body.dataset.state = "generating";
  document.body.dataset.previews = "0";
  $("go").disabled = true;
  $("bar").value = 0;
  status("Generating...");
  try {
    const resp = await fetch(root + "v1/generate",
                             {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!resp.ok) { status(resp.status + ": " + await detail(resp), true);
                    document.body.dataset.state = "error"; return; }
    const out = stream ? await streamed(resp) : await resp.json();
    $("bar").value = 1;
    const base = out.base_images ? out.base_images[0] : out.images[0];
    await Promise.all([show($("base"), png(base)),
                       out.base_images ? show($("up"), png(out.images[0])) : null]);
    $("base-cap").textContent = "base, " + (out.base_size || out.image_size) + " px";
    if (out.base_images) $("up-cap").textContent = "upsampled, " + out.image_size + " px";
    status("seed " + out.seed + ", " + out.settings.sampler + " " + out.settings.steps +
           " steps, guidance " + out.settings.guidance_scale +
           (out.settings.guidance_interval ? " for sigma in (" +
            out.settings.guidance_interval.join(", ") + "]" : "") +
           (out.settings.quality !== "default" ? ", quality " + out.settings.quality : "") +
           " (" + out.elapsed_s + " s)");
    document.body.dataset.state = "done";
  } catch (e) {
    status(String(e), true);
    document.body.dataset.state = "error";
  } finally {
    $("go").disabled = false;
  }
}

function show(img, src) {
  return new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; img.src = src; });
}

$("form").addEventListener("submit", generate);
loadModels().catch((e) => status(String(e), true));
</script>
</body>
</html>
"""
