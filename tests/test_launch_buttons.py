"""Launch buttons open something that can run the chapter, or are not there.

The chapters are MyST Markdown notebooks (.md). Colab opens only .ipynb files from a repository, so
a Colab button on a chapter opens nothing runnable; Binder opens a .md as text unless JupyterLab's
default viewer for Markdown is Jupytext's notebook (binder/postBuild installs binder/overrides.json,
the setting `make lab` uses too). A launch button needs the repository's public URL, which
_config.yml marks as a setting. Checked on the configuration, and on the built pages when there are
some (`make book`).
"""

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
HTML = ROOT / "_build" / "html"
PROVIDERS = ("binderhub_url", "jupyterhub_url", "colab_url", "deepnote_url", "jupyterlite_url", "thebe")
JUPYTEXT_VIEWER = "Jupytext Notebook"


def chapter_sources():
    """Every notebook page of the book (chapters/*.md, which _toc.yml lists), without suffix."""
    return [f"chapters/{p.stem}" for p in sorted((ROOT / "chapters").glob("*.md"))]


def launch(key):
    return (CONFIG.get("launch_buttons") or {}).get(key)


def test_no_colab_or_deepnote_button_on_a_markdown_chapter():
    # The theme links an .ipynb only where one sits next to the .md in the repository.
    for key in ("colab_url", "deepnote_url"):
        if launch(key):
            md_only = [c for c in chapter_sources() if not (ROOT / f"{c}.ipynb").exists()]
            assert not md_only, f"{key} is set but these chapters exist only as MyST .md: {md_only}"


def test_launch_buttons_need_the_repository_url():
    url = (CONFIG.get("repository") or {}).get("url") or ""
    enabled = [key for key in PROVIDERS if launch(key)]
    html = CONFIG.get("html") or {}
    buttons = [
        b for b in ("use_repository_button", "use_issues_button", "use_edit_page_button") if html.get(b)
    ]
    if enabled or buttons:
        assert re.fullmatch(r"https://(github\.com|gitlab\.com)/[\w.-]+/[\w.-]+", url), (
            f"{enabled + buttons} enabled but repository.url is {url!r}: set the book's public repository"
        )
        assert "OWNER" not in url and "REPO" not in url, url


def test_binder_opens_chapters_as_notebooks():
    """Binder's environment installs dmlib and makes Jupytext the viewer of .md, in JupyterLab."""
    overrides = json.loads((ROOT / "binder" / "overrides.json").read_text())
    viewers = overrides["@jupyterlab/docmanager-extension:plugin"]["defaultViewers"]
    assert viewers.get("markdown") == JUPYTEXT_VIEWER and viewers.get("myst") == JUPYTEXT_VIEWER, viewers
    post_build = (ROOT / "binder" / "postBuild").read_text()
    assert "binder/overrides.json" in post_build and "share/jupyter/lab/settings" in post_build
    assert re.search(r"pip install .*-c constraints\.txt .*-e \"\.\[book", post_build), (
        "postBuild installs dmlib"
    )
    assert "binder/overrides.json" in (ROOT / "Makefile").read_text(), "`make lab` uses the same setting"
    if launch("binderhub_url") or launch("jupyterhub_url"):
        assert launch("notebook_interface") == "jupyterlab", "the Jupytext viewer setting is JupyterLab's"


def built_pages():
    return sorted(HTML.rglob("*.html")) if (HTML / "index.html").exists() else []


@pytest.mark.skipif(not built_pages(), reason="no built website (make book)")
def test_built_pages_launch_only_runnable_files():
    links = {}
    for page in built_pages():
        for href in re.findall(r'href="([^"]+)"', page.read_text(encoding="utf-8", errors="replace")):
            links.setdefault(href.replace("&amp;", "&"), page.relative_to(HTML))
    problems = []
    for href, page in links.items():
        if "colab.research.google.com" in href or "deepnote.com" in href:
            if not href.endswith(".ipynb"):
                problems.append(f"{page}: Colab/Deepnote link to a non-notebook: {href}")
        if "/v2/gh/" in href or "/v2/gl/" in href or "/v2/git/" in href:  # a Binder link
            if not (ROOT / "binder" / "postBuild").exists():
                problems.append(f"{page}: Binder link without binder/postBuild: {href}")
            if "urlpath=lab/tree/" not in href:
                problems.append(f"{page}: Binder link not opening JupyterLab: {href}")
    if not (CONFIG.get("repository") or {}).get("url"):
        problems += [
            f"{p}: launch link with no repository set: {h}" for h, p in links.items() if "/v2/g" in h
        ]
    assert not problems, "\n".join(problems[:20])
