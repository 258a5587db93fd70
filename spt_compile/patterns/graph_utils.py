"""Small helpers over Dynamo FX nodes: example values, provenance, constants."""
from __future__ import annotations

import contextlib
import contextvars
import re

import torch
from torch import fx

VIEW_METHODS = frozenset({"view", "reshape", "contiguous", "flatten", "unflatten"})
CAST_METHODS = frozenset({"to", "type", "float", "half", "bfloat16", "double"})


def val(node) -> torch.Tensor | None:
    """The fake tensor Dynamo recorded for a node (None for non-tensors)."""
    if not isinstance(node, fx.Node):
        return None
    v = node.meta.get("example_value", node.meta.get("val"))
    return v if isinstance(v, torch.Tensor) else None


def shape_str(node) -> str:
    v = val(node)
    return "?" if v is None else "[" + ",".join(str(s) for s in v.shape) + "]"


def size_hint(x) -> int | None:
    """An int for a size that may be a SymInt (its hint), None if unknown."""
    if isinstance(x, int):
        return x
    try:
        return int(x.node.hint) if x.node.hint is not None else None
    except Exception:  # noqa: BLE001 - any symbolic failure means "unknown"
        return None


def const_number(x) -> float | None:
    """A Python number, or a node that is a 0-d `torch.full([], number)` / `torch.tensor(number)`."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function":
        if x.target is torch.full and len(x.args) >= 2 and tuple(x.args[0]) == () and isinstance(x.args[1], (int, float)):
            return float(x.args[1])
        if x.target is torch.tensor and len(x.args) == 1 and isinstance(x.args[0], (int, float)):
            return float(x.args[0])
    return None


def is_cast(node) -> bool:
    """A dtype-only cast between floating dtypes (`.to(dtype)`, `.type(dtype)`, `.float()`, ...)."""
    if not isinstance(node, fx.Node) or node.op != "call_method" or node.target not in CAST_METHODS:
        return False
    src, dst = val(node.args[0]), val(node)
    if src is None or dst is None or src.shape != dst.shape or src.device != dst.device:
        return False
    return src.dtype.is_floating_point and dst.dtype.is_floating_point


def is_view(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in VIEW_METHODS


def is_call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def is_binary(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets \
        and len(node.args) == 2 and not node.kwargs


# id(module) -> its name in the user's model, while a graph of that model is analysed (see user_module_names)
_MODULE_NAMES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("spt_module_names",
                                                                                      default=None)


def module_path(node: fx.Node) -> str:
    """The module a node came from, as a user would write it: "model.layers.0.self_attn".

    Dynamo's nn_module_stack keys are module ids: with the user's model known (user_module_names), the name is
    its path in that model even when Dynamo traced a submodule's frame on its own (a graph break, a recompile
    per layer); otherwise Dynamo's source expression is cleaned up."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    key, (path, _type) = list(stack.items())[-1]
    names = _MODULE_NAMES.get()
    if names and str(key) in names:
        return clean_module_path(names[str(key)]) if names[str(key)] else "<root>"
    return clean_module_path(str(path))


@contextlib.contextmanager
def user_module_names(roots):
    """Within the block, module_path names modules by their path in the first of `roots` (nn.Modules, outermost
    first; or one module, or None) that contains them."""
    roots = [roots] if isinstance(roots, torch.nn.Module) else list(roots or [])
    names = {} if roots else None
    for root in roots:
        for name, mod in root.named_modules(remove_duplicate=False):
            names.setdefault(str(id(mod)), name)
    token = _MODULE_NAMES.set(names)
    try:
        yield
    finally:
        _MODULE_NAMES.reset(token)


_ROOT = re.compile(r"^(?:L|G)\[(?:'(?:args|kwargs)'\](?:\[\d+\]|\['[^']*'\])|'[^']*'\])")


def clean_module_path(path: str) -> str:
    """Dynamo's source expression of a module -> the user's dotted path.

    "L['self'].model.layers[0].mlp", "L['args'][0].model.layers.0.mlp" (a decorated forward that takes the model
    as an argument), "L['self']._modules['model'].__dict__['_modules']['layers'][0]" -> "model.layers.0.mlp"."""
    path = _ROOT.sub("", path.strip())
    path = re.sub(r"\.?__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\.?_modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"getattr\((.+?), '([^']+)'\)", r"\1.\2", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"^_orig_mod\.", "", path.strip("."))
    return re.sub(r"\.{2,}", ".", path).strip(".") or "<root>"


def source_line(node: fx.Node) -> str:
    """"file.py:123" of the innermost user frame that created the node."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if not frames:
        return ""
    file, line = frames[-1]
    return f"{file.rsplit('/', 1)[-1]}:{line}"


def copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    """New nodes inherit where the matched code came from (the inspection tool needs it)."""
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node"):
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]
