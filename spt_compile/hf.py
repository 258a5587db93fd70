"""backend="spt" under the Hugging Face `Trainer` and `accelerate`.

`TrainingArguments(torch_compile=True, torch_compile_backend="spt")` cannot work: accelerate turns the backend
name into its `DynamoBackend` enum, which knows only torch's built-in backends, so `Trainer(...)` raises
`ValueError: 'SPT' is not a valid DynamoBackend`. The supported way is to compile the model *in place*
(`nn.Module.compile`) before `Trainer` or `Accelerator.prepare` sees it:

    model = spt_compile.hf.compile_model(model, options={"attention_density": 0.25})
    trainer = Trainer(model=model, args=TrainingArguments(...), ...)      # torch_compile left False

or let a callback do it: `Trainer(model=model, ..., callbacks=[spt_compile.hf.SptCallback(options)])`.

In-place compilation keeps the model's class and its parameter names, so `state_dict()`, `save_pretrained`,
Trainer checkpoints, `resume_from_checkpoint`, PEFT adapters and `accelerator.unwrap_model` see exactly the
names of the uncompiled model (`torch.compile(model)` would wrap it and prefix every key with `_orig_mod.`).
"""
from __future__ import annotations

import functools
import logging

import torch

from spt_compile.options import SptOptions
from spt_compile.report import Report, last_reports

log = logging.getLogger("spt_compile")

_MARK = "_spt_options"  # instance attribute set by compile_model: which options this module was compiled with


def compile_model(model: torch.nn.Module, options=None, *, dynamic: bool | None = None,
                  fullgraph: bool = False) -> torch.nn.Module:
    """Compile `model` in place with backend="spt" and return it (the same object).

    Options are validated here, so a bad key fails before training starts rather than at the first step.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError("compile_model got a torch.compile wrapper (OptimizedModule), whose state_dict keys carry "
                         "'_orig_mod.'; pass the original module instead (wrapper._orig_mod)")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"compile_model expects a torch.nn.Module, got {type(model).__name__}")
    opts = SptOptions.from_dict(options)
    previous = model.__dict__.get(_MARK)
    if previous is not None:
        if previous != opts:
            raise ValueError("model is already compiled with backend='spt' and different options; "
                             "compile a fresh model instead")
        return model
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError("model was already compiled in place (model.compile(...)) with another backend; "
                         "compile a fresh model with spt_compile.hf.compile_model")
    model.compile(backend="spt", options=opts.as_dict(), dynamic=dynamic, fullgraph=fullgraph)
    model.__dict__[_MARK] = opts  # plain attribute: never part of state_dict
    return model


def spt_options_of(model: torch.nn.Module) -> SptOptions | None:
    """The options `compile_model` compiled this module with, or None if it did not."""
    return model.__dict__.get(_MARK)


def merged_report(reports) -> Report:
    merged = Report()
    for r in reports:
        merged.extend(r)
    return merged


def __getattr__(name: str):
    # SptCallback subclasses transformers.TrainerCallback: define it on first use so that compile_model works
    # (and imports fast) without transformers, which is an optional extra.
    if name == "SptCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _callback_class():
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError("SptCallback needs transformers: pip install 'spt-compile[test]'") from e

    class SptCallback(_SptCallbackMixin, TrainerCallback):  # mixin first: its hooks override the no-ops
        __doc__ = _SptCallbackMixin.__doc__

    SptCallback.__module__ = __name__
    return SptCallback


class _SptCallbackMixin:
    """Compile the Trainer's model with backend="spt" (in place) when the Trainer is created, and report.

    After training, `self.report` holds what the compiles during training rewrote; the summary is logged, and
    a warning says so when no site was rewritten at all (e.g. every sequence shorter than `min_seq_len`).
    A model already compiled by `compile_model` is left as it is (then `options` must be None or equal).
    With `model_init` (hyperparameter search) Trainer does not hand callbacks the new model: call
    `compile_model` inside `model_init` instead.
    """

    def __init__(self, options=None):
        self.options = None if options is None else SptOptions.from_dict(options)
        self.report: Report | None = None
        self._before: list[Report] = []

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if getattr(args, "torch_compile", False):
            raise ValueError("TrainingArguments(torch_compile=True) would compile the model a second time with "
                             f"{args.torch_compile_backend!r}; leave torch_compile False when using spt "
                             "(SptCallback / compile_model compile it with backend='spt')")
        if model is not None:
            self._compile(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._compile(model)
        self._before = last_reports()  # holding them keeps their ids unique

    def on_train_end(self, args, state, control, **kwargs):
        seen = {id(r) for r in self._before}
        self.report = merged_report(r for r in last_reports() if id(r) not in seen)
        if not self.report.rewritten():
            log.warning("backend='spt' rewrote no attention or FFN site during training: %s\n%s",
                        self.report.summary(), self.report.table())
        else:
            log.info("%s", self.report.summary())

    def _compile(self, model: torch.nn.Module) -> None:
        if spt_options_of(model) is None or self.options is not None:
            compile_model(model, self.options)
