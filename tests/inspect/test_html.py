"""The HTML page: self-contained, and it renders in headless Chromium (DOM and a non-blank screenshot)."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest

from spt_compile.html_report import render

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium); "
                                                             "the page is still checked without a browser")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append(dict(attrs))


def _chromium(*args, timeout=120):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", *args]
    return subprocess.run(cmd, capture_output=True, timeout=timeout)


def test_page_is_self_contained(tiny_report):
    page = render(tiny_report)
    p = _Tags()
    p.feed(page)
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags and "iframe" not in p.tags
    # the only URLs are XML namespace names (never fetched)
    urls = set(re.findall(r"https?://[^\s\"')<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}, urls
    assert page.count("<svg") == 2 and "<table class=\"sites\"" in page


def test_page_marks_rewritten_nodes_in_the_listings(tiny_report):
    page = render(tiny_report)
    for i, s in enumerate(tiny_report.sites):
        assert f"&lt;- #{i} {s.kind} {s.module}" in page   # a marked listing line names its site


@needs_chromium
def test_page_renders_in_headless_chromium(tiny_report, tmp_path):
    path = tmp_path / "report.html"
    tiny_report.write_html(str(path))
    run = _chromium("--dump-dom", path.as_uri())
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    dom = run.stdout.decode()
    rows = re.search(r'<table class="sites">(.*?)</table>', dom, re.S).group(1)
    assert rows.count("<tr") == len(tiny_report.sites) + 1            # header + one row per site
    assert '<table class="savings-total">' in dom and '<table class="savings-sites">' in dom
    svgs = re.findall(r"<svg.*?</svg>", dom, re.S)
    assert len(svgs) == 2
    for svg in svgs:
        assert len(re.findall(r'<g[^>]*class="node"', svg)) > 10     # the graph's nodes were drawn
    assert "pq_sparse_attention" in svgs[1] and "routed_ffn" in svgs[1]


@needs_chromium
def test_screenshot_is_a_non_blank_png(tiny_report, tmp_path):
    path = tmp_path / "report.html"
    shot = tmp_path / "shot.png"
    tiny_report.write_html(str(path))
    run = _chromium(f"--screenshot={shot}", "--window-size=900,1000", path.as_uri())
    assert run.returncode == 0 and shot.exists(), run.stderr.decode()[-2000:]
    width, height, pixels = decode_png(shot.read_bytes())
    assert (width, height) == (900, 1000)
    background = max(set(pixels[::97]), key=pixels[::97].count)
    ink = sum(p != background for p in pixels) / len(pixels)
    assert 0.02 < ink < 0.9, ink                                      # text, tables and colours, not blank


def decode_png(data: bytes) -> tuple[int, int, list[tuple]]:
    """(width, height, pixels) of an 8-bit RGB / RGBA PNG (enough for Chromium's screenshots)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, prev, pixels = zlib.decompress(idat), width * bpp, bytearray(width * bpp), []
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [tuple(line[i:i + 3]) for i in range(0, stride, bpp)]
        prev = line
    return width, height, pixels


def test_kernel_column_untuned_without_cache_entries(tiny_report):
    page = render(tiny_report)
    row = re.search(r'<table class="sites">.*?</table>', page, re.S).group(0)
    # CPU tensors: the sites would use the CPU tunables, each at its key; the test cache (SPT_CACHE_DIR) is empty
    for kernel in ("attention_cpu_select", "attention_cpu_forward", "attention_cpu_backward", "ffn_cpu_router"):
        assert re.search(kernel + r" \([^)]*\): untuned", row), (kernel, row)


def test_kernel_column_uses_the_autotuners_site_keys(tiny_report, monkeypatch):
    from spt_compile.kernels import autotune
    seen = []

    def site_kernel_keys(op, arguments):
        seen.append((op, tuple(arguments["q"]["shape"]) if "q" in arguments else tuple(arguments["x"]["shape"])))
        return [("attention_fwd" if "attention" in op else "ffn_up", (64, "float32"))]

    monkeypatch.setattr(autotune, "site_kernel_keys", site_kernel_keys, raising=False)
    monkeypatch.setattr(autotune, "describe", lambda kernel, key: f"BLOCK=32 warps=4 for {kernel}", raising=True)
    page = render(tiny_report)
    assert "attention_fwd (64, &#x27;float32&#x27;): BLOCK=32 warps=4 for attention_fwd" in page
    assert sorted(op for op, _ in seen) == ["spt.pq_sparse_attention"] * 2 + ["spt.routed_ffn"] * 2


def test_graph_breaks_are_reported_and_every_graph_is_drawn():
    import spt_compile
    from tests.inspect.tiny_models import OPTIONS, breaking_factory
    model, args = breaking_factory()
    report = spt_compile.explain(model, *args, options=OPTIONS)
    assert len(report.graphs) >= 2 and len(report.rewritten()) == 4
    breaks = report.dynamo["graph_breaks"]
    assert breaks and any("graph_break" in b["reason"] for b in breaks), breaks
    page = render(report)
    assert page.count("<svg") == 2 * len(report.graphs)
    assert "No graph breaks" not in page and html_escape(breaks[0]["reason"]) in page


def html_escape(text):
    import html
    return html.escape(text)


@pytest.mark.slow  # two compiles of two graphs (~20 s on a loaded 2-core CPU)
def test_torch_compile_report_shows_each_graphs_compile_and_recompile_reason():
    import torch

    import spt_compile
    from tests.inspect.tiny_models import OPTIONS, breaking_factory
    model, (x,) = breaking_factory()
    compiled = torch.compile(model, backend="spt", options={**OPTIONS, "inner_backend": "aot_eager"})
    compiled(x)
    compiled(torch.randn(3, *x.shape[1:]))               # a new batch size: both frames recompile
    report = spt_compile.last_report()
    page = render(report)
    table = re.search(r'<table class="compiles">.*?</table>', page, re.S).group(0)
    assert table.count("<tr") == len(report.graphs) + 1 == 3
    assert "torch_dynamo_resume_in_forward" in table and table.count("size mismatch at index 0") == 2


def test_kernel_column_without_site_keys_lists_the_ops_kernels(tiny_report, monkeypatch):
    from spt_compile.kernels import autotune
    monkeypatch.setattr(autotune, "site_kernel_keys", lambda op, arguments: None)   # e.g. Triton without site_key
    row = re.search(r'<table class="sites">.*?</table>', render(tiny_report), re.S).group(0)
    assert "attention_cpu_forward: untuned" in row and "ffn_cpu_router: untuned" in row
    assert "ffn_up" not in row                     # Triton kernels are not what CPU tensors run
