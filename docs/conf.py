"""Sphinx configuration of jaxdrop's site: the README, the guides in docs/ and the API reference.

Build it with ``bash .ci/build_docs.sh`` (warnings are errors), then open
``docs/_build/html/index.html``.

Why Sphinx (with MyST-parser, autodoc and napoleon) rather than MkDocs + mkdocstrings: the
docstrings are reStructuredText inside Google sections (``code``, :func:`roles`, doctests),
which autodoc and napoleon read as written, as in flax, optax and jax, the libraries jaxdrop
sits beside; mkdocstrings would render them as Markdown. MyST reads the existing Markdown pages
unchanged.

The source directory is the repository root (this folder holds only the configuration, hence
``sphinx-build -c docs . docs/_build/html``), limited by ``include_patterns`` to the pages
below. So the README and docs/*.md link to each other (``docs/semantics.md``,
``../BENCHMARKS.md``, ``#numbers``) exactly as they do in the repository, with no copies or
rewritten links.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib
import textwrap

from flax import linen

import jaxdrop

ROOT = pathlib.Path(__file__).resolve().parent.parent

project = "jaxdrop"
author = "the jaxdrop authors"
copyright = "the jaxdrop authors"  # noqa: A001 (Sphinx's name)
release = version = jaxdrop.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]

# The landing page is the README; the pages are the repository's own Markdown files.
root_doc = "README"
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
include_patterns = ["README.md", "BENCHMARKS.md", "CHANGELOG.md", "docs/*.md", "docs/api/*.rst"]
exclude_patterns = [".*", "docs/_build", "build", "dist", "runs"]

# Guides in the order of the README's "Read more"; any other docs/*.md page follows, so a new
# one appears without an edit here.
_GUIDE_ORDER = ["semantics", "variants", "attention", "mc", "schedules", "training", "performance"]
_API_PAGES = ["jaxdrop", "linen", "nnx", "mc", "checks", "schedules"]


def _guides() -> list[str]:
  pages = {path.stem for path in (ROOT / "docs").glob("*.md")}
  return [p for p in _GUIDE_ORDER if p in pages] + sorted(pages - set(_GUIDE_ORDER))


def _toctree(caption: str, entries: list[str]) -> str:
  lines = "\n".join(entries)
  return f"\n\n```{{toctree}}\n:hidden:\n:caption: {caption}\n\n{lines}\n```\n"


def _add_navigation(app, docname, source):
  """Appends the site's (hidden) table of contents to the README, in the site only."""
  if docname == root_doc:
    source[0] += _toctree("Guides", [f"docs/{page}" for page in _guides()])
    source[0] += _toctree("API reference", [f"docs/api/{page}" for page in _API_PAGES])
    source[0] += _toctree("Project", ["BENCHMARKS", "CHANGELOG"])


def _write_index(app, exception):
  """index.html sends a browser to the landing page, README.html."""
  if exception is None and app.builder.format == "html":
    target = app.builder.get_target_uri(root_doc)
    (pathlib.Path(app.outdir) / "index.html").write_text(
        f'<!DOCTYPE html>\n<meta charset="utf-8">\n<title>{project}</title>\n'
        f'<meta http-equiv="refresh" content="0; url={target}">\n'
        f'<link rel="canonical" href="{target}">\n<a href="{target}">{project}</a>\n'
    )


def _resolve_unqualified(app, env, node, contnode):
  """``:func:`dropout``` in a docstring shown on the linen or nnx page means jaxdrop's."""
  target = node.get("reftarget", "")
  if node.get("refdomain") != "py" or "." in target or target not in jaxdrop.__all__:
    return None
  return env.get_domain("py").resolve_xref(
      env, node["refdoc"], app.builder, node["reftype"], f"jaxdrop.{target}", node, contnode)


def _field_defaults(cls) -> dict[str, str]:
  """The source text of each dataclass field's default in ``cls`` and its jaxdrop bases."""
  defaults = {}
  for base in reversed(cls.__mro__):
    if not base.__module__.startswith("jaxdrop"):
      continue
    source = textwrap.dedent(inspect.getsource(base))
    for node in ast.parse(source).body[0].body:
      if isinstance(node, ast.AnnAssign) and node.value is not None:
        defaults[node.target.id] = ast.get_source_segment(source, node.value)
  return defaults


def _linen_signature(cls) -> str:
  """A linen module's fields as its constructor takes them, without flax's parent and name."""
  defaults = _field_defaults(cls)
  text = []
  for field in dataclasses.fields(cls):
    if field.name in ("parent", "name"):
      continue
    if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
      text.append(field.name)
    else:
      text.append(f"{field.name}={defaults.get(field.name, repr(field.default))}")
  return f"({', '.join(text)})"


def _constructor_signature(app, what, name, obj, options, signature, return_annotation):
  """Module signatures as a user writes the constructor call.

  linen modules: their fields, not the dataclass ``__init__`` with flax's ``parent`` and
  ``name``; nnx modules: their ``__init__``'s signature, not their metaclass's
  ``(*args, **kwargs)``. Defaults as written in the source (``nnx.initializers.lecun_normal()``,
  not a function's repr), without annotations, as ``autodoc_typehints`` and
  ``autodoc_preserve_defaults`` do.
  """
  if what != "class" or not name.startswith("jaxdrop."):
    return None
  if isinstance(obj, type) and issubclass(obj, linen.Module):
    return _linen_signature(obj), return_annotation
  if signature != "(*args, **kwargs)":
    return None
  source = textwrap.dedent(inspect.getsource(inspect.unwrap(obj.__init__)))
  args = ast.parse(source).body[0].args
  positional = args.posonlyargs + args.args
  defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
  params = [(a.arg, d) for a, d in zip(positional, defaults)][1:]  # Without self.
  text = [a if d is None else f"{a}={ast.get_source_segment(source, d)}" for a, d in params]
  if args.vararg:
    text.append(f"*{args.vararg.arg}")
  elif args.kwonlyargs:
    text.append("*")
  text += [a.arg if d is None else f"{a.arg}={ast.get_source_segment(source, d)}"
           for a, d in zip(args.kwonlyargs, args.kw_defaults)]
  if args.kwarg:
    text.append(f"**{args.kwarg.arg}")
  return f"({', '.join(text)})", return_annotation


def setup(app):
  app.connect("autodoc-process-signature", _constructor_signature)
  app.connect("source-read", _add_navigation)
  app.connect("build-finished", _write_index)
  app.connect("missing-reference", _resolve_unqualified)


# Every reference must resolve (the build runs with -n -W), except to the types of the
# libraries jaxdrop builds on, whose inventories would need the network.
nitpick_ignore_regex = [
    ("py:class", r"(numpy|jax|jaxlib|flax|optax|chex|collections|typing|types)(\..*)?"),
    ("py:obj", r"(numpy|jax|jaxlib|flax|optax|chex|collections|typing|types)(\..*)?"),
]


# MyST: GitHub-style anchors for headings, so links such as semantics.md#memory-in-a-train-step
# resolve as on GitHub.
myst_heading_anchors = 4

# autodoc + napoleon: Google-style docstrings, members in source order.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
# No type hints: jax.typing.ArrayLike would print as the 8-type union it stands for; each
# docstring says what an argument is.
autodoc_typehints = "none"
napoleon_attr_annotations = False
autodoc_preserve_defaults = True

html_theme = "furo"
html_title = f"jaxdrop {release}"
html_copy_source = False
