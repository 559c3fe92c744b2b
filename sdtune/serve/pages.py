"""The pages `sdtune serve` shows: the prompt page (/), the runs (/runs) and one run (/runs/NAME: its checkpoints,
sample grids per epoch, loss curve, and its evaluation page or latent report when present). Self-contained: inline
CSS and script, no external scripts or fonts. A page serves only files its own scan of the runs folder listed: a
request names a run and a file of that list, never a path."""

from __future__ import annotations

import html
import json
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, Response

from sdtune.serve.engine import Engine

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:12px;max-width:960px;margin:auto;color:#222}
h1{font-size:1.3em} nav a{margin-right:1em} label{display:block;margin:.5em 0 .2em;font-size:.9em}
input,textarea,button{font:inherit;width:100%;box-sizing:border-box;padding:.5em}
button{margin-top:.8em;background:#2a5db0;color:#fff;border:0;border-radius:4px}
.row{display:flex;gap:.5em} .row>div{flex:1} #images{display:flex;flex-wrap:wrap;gap:8px;margin-top:1em}
#images img{width:calc(50% - 4px);max-width:256px;image-rendering:pixelated;border:1px solid #ccc}
#strip img{width:64px;margin-right:4px;image-rendering:pixelated} #slider{width:100%;margin-top:1em}
#status{font-size:.9em;color:#555;min-height:1.2em} img.grid{max-width:100%} .meta{color:#555;font-size:.9em}
table{border-collapse:collapse} td,th{border-bottom:1px solid #ddd;padding:.2em .6em;text-align:left}
"""

PROMPT_SCRIPT = """
const form = document.getElementById('form');
form.addEventListener('submit', async (event) => {
  event.preventDefault();
  const box = document.getElementById('images'), status = document.getElementById('status');
  const get = (id) => document.getElementById(id).value;
  const count = Math.max(1, Math.min(8, parseInt(get('count')) || 1));
  const headers = {'Content-Type': 'application/json'};
  if (get('key')) headers['Authorization'] = 'Bearer ' + get('key');
  box.innerHTML = ''; let done = 0; status.textContent = 'generating ' + count + '...';
  await Promise.all([...Array(count).keys()].map(async (i) => {
    const body = {prompt: get('prompt'), negative_prompt: get('negative'), seed: (parseInt(get('seed')) || 0) + i,
                  steps: parseInt(get('steps')) || 25, guidance: parseFloat(get('guidance')) || 4, format: 'json'};
    let answer;
    for (let attempt = 0; attempt < 10; attempt++) {  // a full queue answers 429: wait as told, then again
      answer = await fetch('/v1/generate', {method: 'POST', headers, body: JSON.stringify(body)});
      if (answer.status !== 429) break;
      status.textContent = 'queue full, retrying...';
      await new Promise((r) => setTimeout(r, 1000 * (parseInt(answer.headers.get('Retry-After')) || 1)));
    }
    const data = await answer.json();
    if (!answer.ok) { status.textContent = 'error ' + answer.status + ': ' + JSON.stringify(data.detail); return; }
    const img = document.createElement('img');
    img.src = 'data:image/png;base64,' + data.images[0]; img.alt = body.prompt + ' (seed ' + body.seed + ')';
    img.title = img.alt; box.appendChild(img); done += 1;
    status.textContent = done + ' of ' + count + ' done';
  }));
});
"""


INTERPOLATE_SCRIPT = """
document.getElementById('form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const get = (id) => document.getElementById(id).value, status = document.getElementById('status');
  const headers = {'Content-Type': 'application/json'};
  if (get('key')) headers['Authorization'] = 'Bearer ' + get('key');
  const body = {prompt_a: get('a'), prompt_b: get('b'), seed: parseInt(get('seed')) || 0,
                frames: parseInt(get('frames')) || 5, steps: parseInt(get('steps')) || 25};
  status.textContent = 'generating ' + body.frames + ' frames...';
  const answer = await fetch('/v1/interpolate', {method: 'POST', headers, body: JSON.stringify(body)});
  const data = await answer.json();
  if (!answer.ok) { status.textContent = 'error ' + answer.status + ': ' + JSON.stringify(data.detail); return; }
  const frames = data.images.map((b64, i) => ({src: 'data:image/png;base64,' + b64, alpha: data.alphas[i]}));
  const slider = document.getElementById('slider'), shown = document.getElementById('frame');
  const show = () => { const f = frames[slider.value]; shown.src = f.src;
                       shown.alt = 'alpha ' + f.alpha; status.textContent = 'alpha ' + f.alpha; };
  slider.max = frames.length - 1; slider.value = 0; slider.disabled = false; slider.oninput = show; show();
  document.getElementById('strip').innerHTML = frames.map((f) => '<img src="' + f.src + '" alt="alpha ' +
    f.alpha + '">').join('');
});
"""


def _page(title: str, body: str, script: str = "") -> HTMLResponse:
    text = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        "<nav><a href='/'>prompt</a><a href='/interpolate'>interpolate</a><a href='/runs'>runs</a></nav>"
        f"{body}{f'<script>{script}</script>' if script else ''}</body></html>"
    )
    return HTMLResponse(text)


def find_runs(root: Path) -> dict[str, Path]:
    """Run folders under `root` (up to two levels): those with checkpoints/ or a steps.jsonl."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for candidate in sorted([root, *root.glob("*"), *root.glob("*/*")]):
        if candidate.is_dir() and ((candidate / "checkpoints").is_dir() or (candidate / "steps.jsonl").is_file()):
            found[str(candidate.relative_to(root)) if candidate != root else root.name] = candidate
    return found


def run_files(run: Path) -> dict[str, Path]:
    """The files a run's page may show: sample grids per checkpoint, the evaluation page, the latent report."""
    files: dict[str, Path] = {}
    for grid in sorted(run.glob("checkpoints/*/samples.png")):
        files[f"{grid.parent.name}/samples.png"] = grid
    for name in ("eval/eval.html", "eval.html", "report.html", "latent_report/report.html"):
        if (run / name).is_file():
            files[name] = run / name
    return files


def loss_points(run: Path) -> list[tuple[int, float]]:
    """(step, loss) from the run's steps.jsonl (every optimizer step), skipping unreadable lines."""
    points = []
    path = run / "steps.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                points.append((int(record["step"]), float(record["loss"])))
            except (ValueError, KeyError, TypeError):
                continue
    return points


def add_pages(app: FastAPI, engine: Engine, runs_root: Path | None, needs_key: bool) -> None:
    root = runs_root or Path("runs")
    key = "<label for='key'>API key</label><input id='key' type='password'>" if needs_key else (
        "<input id='key' type='hidden' value=''>")  # fmt: skip  # the pages' scripts send it as a Bearer token

    @app.get("/", response_class=HTMLResponse)
    async def prompt_page() -> HTMLResponse:
        body = (
            f"<h1>sdtune: try the model</h1><p class='meta'>{html.escape(engine.label)}; "
            f"{engine.native_size} px</p><form id='form'>"
            "<label for='prompt'>prompt</label><textarea id='prompt' rows='2' required>"
            "a photo of a large red circle on a blue background</textarea>"
            "<label for='negative'>negative prompt</label><input id='negative' value=''>"
            "<div class='row'><div><label for='seed'>seed</label><input id='seed' type='number' value='0' min='0'>"
            "</div><div><label for='count'>images</label><input id='count' type='number' value='4' min='1' max='8'>"
            "</div></div><div class='row'><div><label for='steps'>steps</label>"
            "<input id='steps' type='number' value='25' min='1'></div><div><label for='guidance'>guidance</label>"
            f"<input id='guidance' type='number' value='4' step='0.5' min='1'></div></div>{key}"
            "<button id='go' type='submit'>generate</button></form><div id='status'></div><div id='images'></div>"
        )
        return _page("sdtune", body, PROMPT_SCRIPT)

    @app.get("/interpolate", response_class=HTMLResponse)
    async def interpolate_page() -> HTMLResponse:
        body = (
            "<h1>interpolate between two prompts</h1><p class='meta'>The same seed's noise for every frame; the "
            "prompt embeddings move from A to B (slerp).</p><form id='form'>"
            "<label for='a'>prompt A</label><input id='a' value='a photo of a large red circle on a blue background'>"
            "<label for='b'>prompt B</label><input id='b' value='a photo of a large yellow square on a blue "
            "background'><div class='row'><div><label for='seed'>seed</label><input id='seed' type='number' "
            "value='0' min='0'></div><div><label for='frames'>frames</label><input id='frames' type='number' "
            "value='5' min='2' max='8'></div><div><label for='steps'>steps</label><input id='steps' type='number' "
            f"value='25' min='1'></div></div>{key}<button id='go' type='submit'>interpolate</button></form>"
            "<div id='status'></div><input id='slider' type='range' min='0' max='0' value='0' disabled "
            "aria-label='interpolation'><div id='images'><img id='frame' alt=''></div><div id='strip'></div>"
        )
        return _page("interpolate", body, INTERPOLATE_SCRIPT)

    @app.get("/runs", response_class=HTMLResponse)
    async def runs_page() -> HTMLResponse:
        found = find_runs(root)
        rows = "".join(
            f"<tr><td><a href='/runs/{html.escape(name)}'>{html.escape(name)}</a></td>"
            f"<td>{len(list((path / 'checkpoints').glob('epoch=*')))}</td></tr>"
            for name, path in found.items()
        )
        body = f"<h1>runs in {html.escape(str(root))}</h1>" + (
            f"<table><tr><th>run</th><th>checkpoints</th></tr>{rows}</table>" if rows else "<p>no runs found</p>"
        )
        return _page("runs", body)

    def _run(name: str) -> Path:
        found = find_runs(root)
        if name not in found:
            raise HTTPException(404, "no such run")
        return found[name]

    @app.get("/runs/{name:path}/loss.png")
    async def loss_png(name: str) -> Response:
        from sdtune.latent.plots import figure_png

        points = loss_points(_run(name))
        if not points:
            raise HTTPException(404, "no steps.jsonl")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3))
        axis.plot([s for s, _ in points], [v for _, v in points], linewidth=0.8)
        axis.set(xlabel="step", ylabel="training loss", title=name)
        axis.grid(alpha=0.3)
        return Response(figure_png(figure, dpi=100), media_type="image/png")

    @app.get("/runs/{name:path}/file/{file:path}")
    async def run_file(name: str, file: str) -> FileResponse:
        files = run_files(_run(name))
        if file not in files:
            raise HTTPException(404, "not a file of this run's page")
        return FileResponse(files[file])

    @app.get("/runs/{name:path}", response_class=HTMLResponse)
    async def run_page(name: str) -> HTMLResponse:
        run = _run(name)
        files = run_files(run)
        quoted = html.escape(name)
        parts = [f"<h1>{quoted}</h1>"]
        checkpoints = sorted(p.name for p in (run / "checkpoints").glob("epoch=*"))
        parts.append("<p class='meta'>checkpoints: " + (", ".join(map(html.escape, checkpoints)) or "none") + "</p>")
        if loss_points(run):
            parts.append(f"<h2>loss</h2><img class='grid' alt='loss curve' src='/runs/{quoted}/loss.png'>")
        for key in files:
            if key.endswith("samples.png"):
                label = html.escape(key.split("/")[0])
                parts.append(f"<h2>samples at {label}</h2><img class='grid' alt='samples at {label}' "
                             f"src='/runs/{quoted}/file/{html.escape(key)}'>")  # fmt: skip
        for key in files:
            if key.endswith(".html"):
                parts.append(f"<p><a href='/runs/{quoted}/file/{html.escape(key)}'>{html.escape(key)}</a></p>")
        return _page(name, "".join(parts))
