"""Render report sections as one self-contained HTML page: PNGs inlined as data URIs, no external files."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

from sdtune.data.latents import LatentSettings

STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.5; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6em 1em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.meta { color: #666; font-size: 0.85em; }
"""


@dataclass
class Section:
    """One part of the page: a title, plain-language text, figures (PNG bytes) and an optional table."""

    title: str
    text: str
    figures: list[tuple[str, bytes]] = field(default_factory=list)
    table: list[list[str]] | None = None


def figure_html(caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    alt = html.escape(caption)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'


def table_html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def vae_note(vae: str) -> str:
    """What the page's numbers mean for the VAE that made the latents."""
    if vae in ("tiny", "sd15-random"):
        return (
            '<p class="note">These latents come from a <b>randomly initialised test VAE</b> (the offline "'
            f'{html.escape(vae)}" preset): its latents are a random projection of the pixels and its reconstructions '
            "are noise. The page shows how the analysis works; run the same command on latents from a real "
            "Stable Diffusion VAE for the real experiment.</p>"
        )
    if vae == "tiny-pretrained":
        return (
            '<p class="note">These latents come from <b>tiny-pretrained</b>\'s VAE: a real, learned latent space '
            "(16x16x4 at 64 px, downsampling 4), trained by sdtune on synthetic shapes and on digits 0-1599 (the "
            "held-out digits were never seen). It is not Stable Diffusion's VAE (64x64x4 at 512 px, trained on "
            "LAION): the numbers show what a small learned latent space keeps, not what SD's keeps; encode with "
            "an SD VAE for that experiment.</p>"
        )
    return ""


def render_page(sections: list[Section], settings: LatentSettings, num_samples: int, vae: str) -> str:
    caveat = vae_note(vae)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>Latent space report</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>What is the Stable Diffusion VAE's latent space good for?</h1>",
        f'<p class="meta">{num_samples} images; VAE {html.escape(settings.vae)} at {settings.resolution} px; '
        f"latents {'x'.join(map(str, settings.latent_shape))} (scaling {settings.scaling_factor}).</p>",
        caveat,
    ]
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2><p>{html.escape(section.text)}</p>")
        if section.figures:
            figures = "".join(figure_html(c, png) for c, png in section.figures)
            parts.append(f'<div class="figures">{figures}</div>')
        if section.table:
            parts.append(table_html(section.table))
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
