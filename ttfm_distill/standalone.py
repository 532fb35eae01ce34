"""Standalone exports: the module files diffusers needs to load a pipeline folder without ttfm-distill.

:func:`bundle_source` joins the package's sampling-side modules (time
convention, family adapters, the VAE and prompt helpers, the students, the
pipeline) into one file, dropping the imports between them; a standalone export
carries it twice: ``ttfm_pipeline.py`` (the pipeline, named in
``model_index.json``'s ``_class_name``) and ``flow_map/ttfm_flow_map.py`` (the
component).  ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``
then imports only torch, diffusers and safetensors (and transformers for text
students).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

#: file (without .py) at the folder's top that defines the pipeline, and the component's module file
MODULE = "ttfm_pipeline"
COMPONENT_MODULE = "ttfm_flow_map"
#: the modules bundled, in dependency order (paths under ttfm_distill/)
BUNDLED = ("errors.py", "convention.py", "teachers/families.py", "teachers/schedulers.py", "teachers/pipeline.py",
           "student.py", "mlp.py", "pipeline.py")
PACKAGE = Path(__file__).resolve().parent


def _strip_package_imports(source: str, name: str) -> list[str]:
    """``source`` without its docstring, ``from __future__`` and relative imports (the names live in the bundle)."""
    tree = ast.parse(source)
    drop: set[int] = set()
    replace: dict[int, str] = {}  # first line of a dropped nested import -> "pass" at its indent (never an empty block)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module == "__future__"):
            drop.update(range(node.lineno, node.end_lineno + 1))
            if node.col_offset:
                replace[node.lineno] = " " * node.col_offset + "pass"
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        drop.update(range(body[0].lineno, body[0].end_lineno + 1))
    out = [f"# ---- from ttfm_distill/{name} " + "-" * max(0, 60 - len(name))]
    for i, line in enumerate(source.splitlines(), start=1):
        if i not in drop:
            out.append(line)
        elif i in replace:
            out.append(replace[i])
    return out


def bundle_source() -> str:
    """One self-contained module defining ``TwoTimeFlowMap``, ``MlpFlowMap`` and ``TTFMPipeline``."""
    from . import __version__

    head = [f'"""TTFMPipeline and its flow-map component, from ttfm-distill {__version__}: generated, do not edit.',
            "",
            'Loaded by diffusers with trust_remote_code=True when ttfm-distill is not installed."""',
            "", "from __future__ import annotations", ""]
    body: list[str] = []
    for name in BUNDLED:
        body += _strip_package_imports((PACKAGE / name).read_text(), name) + [""]
    source = "\n".join(head + body) + "\n"
    ast.parse(source)  # a broken bundle fails here, at export, not at the user's load
    return source


def write_standalone(folder: str | Path) -> None:
    """Add the module files to a pipeline export in ``folder`` and point ``model_index.json`` at them."""
    from .fileio import write_text
    from .student import COMPONENT

    folder = Path(folder)
    source = bundle_source()
    write_text(folder / f"{MODULE}.py", source)
    write_text(folder / COMPONENT / f"{COMPONENT_MODULE}.py", source)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [MODULE, "TTFMPipeline"]
    index[COMPONENT] = [COMPONENT_MODULE, index[COMPONENT][1]]
    write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
