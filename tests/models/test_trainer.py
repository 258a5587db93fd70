"""backend="spt" under the Hugging Face Trainer, PEFT LoRA and accelerate, through spt_compile.hf.

Exact mode (density 1.0) must train exactly like the uncompiled model (same losses, same weights), so these
tests compare against plain eager runs: a Trainer with gradient accumulation and evaluation, a checkpoint
resume, and an accelerate loop. Tiny 2-layer LLaMA (d=64), 32 tokens, min_seq_len=1, aot_eager (inductor would
only add compile time here).
"""
import json
import math

import pytest
import torch

import spt_compile
from spt_compile.hf import compile_model, spt_options_of
from spt_compile.inspect_models import small_hf_model
from tests.helpers import EXACT

T = pytest.importorskip("transformers")

SEQ, VOCAB, LAYERS = 32, 128, 2
FAST = {"min_seq_len": 1, "inner_backend": "aot_eager"}
EXACT_FAST = {**EXACT, **FAST}


def _model():
    torch.manual_seed(0)
    return small_hf_model("llama", "sdpa", layers=LAYERS, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=VOCAB)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-3, logging_steps=1,
                eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return T.TrainingArguments(**{**base, **kw})


def _trainer(model, out, callbacks=None, **kw):
    return T.Trainer(model=model, args=_args(out, **kw), train_dataset=_Tokens(16, 0), eval_dataset=_Tokens(4, 1),
                     callbacks=callbacks)


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    # Adam divides by sqrt(v): a rounding-level gradient difference on a near-zero gradient moves a weight by up
    # to lr = 1e-3 per step, so compare at 1e-4 absolute (4 steps of lr 1e-3 move weights by up to 4e-3)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


def _spt_sites(reports):
    merged = spt_compile.hf.merged_report(reports)
    return len(merged.rewritten("attention")), len(merged.rewritten("ffn"))


def test_trainer_with_grad_accumulation_and_eval_matches_eager_in_exact_mode(tmp_path):
    eager = _trainer(_model(), tmp_path / "eager")
    eager.train()
    spt_compile.report.clear_reports()
    model = compile_model(_model(), EXACT_FAST)
    spt = _trainer(model, tmp_path / "spt")
    spt.train()

    assert spt.state.global_step == 4
    losses, ref = _history(spt, "loss"), _history(eager, "loss")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx(ref, rel=1e-4)
    assert len(_history(spt, "eval_loss")) == 2
    assert _history(spt, "eval_loss") == pytest.approx(_history(eager, "eval_loss"), rel=1e-4)
    _assert_same_weights(model, eager.model)
    # one compile for training, one for evaluation (eval mode, no grad): each rewrote every layer
    reports = spt_compile.last_reports()
    assert len(reports) == 2 and all(_spt_sites([r]) == (LAYERS, LAYERS) for r in reports), reports


def test_checkpoint_has_user_names_and_resume_continues_exactly(tmp_path):
    from safetensors.torch import load_file

    # no evaluation here (the test above covers it): one compile per run
    straight = _trainer(compile_model(_model(), EXACT_FAST), tmp_path / "a", save_strategy="steps", save_steps=2,
                        eval_strategy="no")
    straight.train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    saved = load_file(ckpt / "model.safetensors")
    expected = set(_model().state_dict())
    # the checkpoint omits tied weights the same way an uncompiled model's would: compare with save_pretrained
    _model().save_pretrained(tmp_path / "plain")
    assert set(saved) == set(load_file(tmp_path / "plain" / "model.safetensors"))
    assert set(saved) <= expected and not any("_orig_mod" in k for k in saved)

    resumed_model = compile_model(_model(), EXACT_FAST)
    resumed = _trainer(resumed_model, tmp_path / "b", eval_strategy="no")
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 4
    assert set(resumed_model.state_dict()) == expected
    _assert_same_weights(resumed_model, straight.model)
    assert _history(resumed, "loss")[-2:] == pytest.approx(_history(straight, "loss")[-2:], rel=1e-4)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 2


# peft calls a transformers API that transformers 5 deprecated (third-party, not ours)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_trains_through_the_same_path(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base = _model()
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    spt_compile.report.clear_reports()
    model = compile_model(lora, {"attention_density": 0.5, "ffn_density": 0.5, **FAST})  # sparse, not exact
    trainer = _trainer(model, tmp_path / "lora", learning_rate=1e-2, max_steps=2)
    trainer.train()

    assert trainer.state.global_step == 2
    assert all(math.isfinite(x) for x in _history(trainer, "loss") + _history(trainer, "eval_loss"))
    assert _spt_sites(spt_compile.last_reports()[:1]) == (LAYERS, LAYERS)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b.values()), "LoRA B started at zero and must train"
    merged_back = model.get_base_model().state_dict()
    for k, v in frozen.items():  # the frozen base weights are untouched
        key = k.replace("q_proj.weight", "q_proj.base_layer.weight").replace("v_proj.weight", "v_proj.base_layer.weight")
        assert torch.equal(merged_back[key], v), k
    model.save_pretrained(tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys and all("lora_" in k and "_orig_mod" not in k for k in keys), keys


def test_accelerate_loop_with_grad_accumulation_matches_eager_in_exact_mode():
    from accelerate import Accelerator

    def run(model):
        acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loader = torch.utils.data.DataLoader(_Tokens(8, 0), batch_size=2)
        model, opt, loader = acc.prepare(model, opt, loader)
        losses = []
        for batch in loader:
            with acc.accumulate(model):
                loss = model(**batch).loss
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
        return acc.unwrap_model(model), losses

    eager, ref = run(_model())
    spt_compile.report.clear_reports()
    model = compile_model(_model(), EXACT_FAST)
    unwrapped, losses = run(model)
    assert unwrapped is model and spt_options_of(unwrapped) is not None
    assert losses == pytest.approx(ref, rel=1e-4)
    _assert_same_weights(unwrapped, eager)
    assert set(unwrapped.state_dict()) == set(eager.state_dict())
    assert spt_compile.last_reports() and _spt_sites(spt_compile.last_reports()[:1]) == (LAYERS, LAYERS)


def test_callback_compiles_reports_and_rejects_torch_compile(tmp_path, caplog):
    callback = spt_compile.hf.SptCallback(FAST)
    model = _model()
    trainer = _trainer(model, tmp_path / "cb", callbacks=[callback], max_steps=2, eval_strategy="no")
    assert spt_options_of(model) == spt_compile.SptOptions.from_dict(FAST)
    trainer.train()
    assert (len(callback.report.rewritten("attention")), len(callback.report.rewritten("ffn"))) == (LAYERS, LAYERS)

    quiet = spt_compile.hf.SptCallback({**FAST, "min_seq_len": 10_000, "ffn": "dense"})
    with caplog.at_level("WARNING", logger="spt_compile"):
        _trainer(_model(), tmp_path / "none", callbacks=[quiet], max_steps=1, eval_strategy="no").train()
    assert "rewrote no attention or FFN site" in caplog.text and "min_seq_len" in caplog.text

    with pytest.raises(ValueError, match="torch_compile"):
        _trainer(_model(), tmp_path / "tc", callbacks=[spt_compile.hf.SptCallback()], torch_compile=True,
                 torch_compile_backend="inductor")


def test_torch_compile_backend_spt_is_rejected_by_accelerate_as_the_readme_says(tmp_path):
    # The reason compile_model exists; if accelerate starts accepting custom backends, update the README.
    with pytest.raises(ValueError, match="not a valid DynamoBackend"):
        _trainer(_model(), tmp_path / "x", torch_compile=True, torch_compile_backend="spt")


def test_compile_model_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown spt option"):
        compile_model(_model(), {"atention_density": 0.5})
    with pytest.raises(ValueError, match="_orig_mod"):
        compile_model(torch.compile(_model(), backend="spt"))
    with pytest.raises(ValueError, match="different options"):
        compile_model(compile_model(_model(), FAST), {**FAST, "ffn_density": 0.25})
    m = _model()
    m.compile(backend="eager")
    with pytest.raises(ValueError, match="another backend"):
        compile_model(m)
    m = _model()
    assert compile_model(compile_model(m, FAST), FAST) is m  # same options twice: a no-op
