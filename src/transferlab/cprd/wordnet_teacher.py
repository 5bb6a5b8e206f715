"""The `cprd-wordnet` teacher: a MiniLM cross-encoder fine-tuned on (example, gloss) pairs.

MiniLM (all-MiniLM-L6-v2) has six BERT layers. The teacher runs the bottom `6 - J` of them on each
text alone (frozen, so their token states are computed once per text and cached) and the top J
jointly over [example tokens ; gloss tokens], where every example token attends to every gloss
token. The joint layers start from MiniLM's own pre-trained weights and are fine-tuned; J = 6 is a
full cross-encoder (only the embeddings are per text). The pair score is BLIP-2's "ITM + ITC":
an interaction head on the pooled joint states (its last layer starts at zero) plus a fixed multiple
of the cosine of the two MiniLM sentence embeddings. At step 0 the teacher therefore ranks
exactly like zero-shot MiniLM, and the checkpoint kept is the best on validation re-ranking
(step 0 included), so fine-tuning can only be kept where it helps on held-out synsets.

Reconstructed for CPU (a fine-tuned MiniLM cross-encoder within a CPU budget; the split point J is
the `teacher_joint_layers` option): with J < 6 the bottom layers see one text at a time, like a
fusion encoder (ALBEF); each segment keeps its own positions, and a learned segment vector (zero at
start) marks the gloss tokens.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UserError
from ..data import minilm_path


class BertPairLayer(nn.Module):
    """One post-LayerNorm BERT encoder layer (self-attention + GELU FFN) with a boolean key mask.

    Written here rather than calling Hugging Face's `BertLayer` because that layer's call signature
    and return type change between transformers releases; `from_hf` copies a `BertLayer`'s weights.
    """

    def __init__(self, d: int = 384, heads: int = 12, d_ff: int = 1536, eps: float = 1e-12):
        super().__init__()
        if d % heads:
            raise UserError(f"hidden size {d} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.ff1, self.ff2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    @classmethod
    def from_hf(cls, layer, heads: int, eps: float) -> BertPairLayer:
        att, d = layer.attention, layer.attention.output.dense.weight.shape[0]
        new = cls(d, heads, layer.intermediate.dense.weight.shape[0], eps)
        with torch.no_grad():
            sa = att.self
            new.qkv.weight.copy_(torch.cat([sa.query.weight, sa.key.weight, sa.value.weight]))
            new.qkv.bias.copy_(torch.cat([sa.query.bias, sa.key.bias, sa.value.bias]))
            for mine, theirs in ((new.out, att.output.dense), (new.ln1, att.output.LayerNorm),
                                 (new.ff1, layer.intermediate.dense), (new.ff2, layer.output.dense),
                                 (new.ln2, layer.output.LayerNorm)):
                mine.load_state_dict(theirs.state_dict())
        return new

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x [n, L, d]; keep [n, L] bool (False = padding, never attended to)."""
        n, L, d = x.shape
        q, k, v = self.qkv(x).view(n, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = self.ln1(x + self.out(a.transpose(1, 2).reshape(n, L, d)))
        return self.ln2(x + self.ff2(F.gelu(self.ff1(x))))


def _pool(h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked tokens (MiniLM's sentence pooling)."""
    return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)


def _load_minilm(path):
    from transformers import AutoModel, AutoTokenizer  # optional dependency

    p = minilm_path(path)
    return AutoTokenizer.from_pretrained(p), AutoModel.from_pretrained(p).eval()


@torch.no_grad()
def encode_minilm(texts: list[str], max_tokens: int, joint_layers: int, path=None, batch: int = 64):
    """Per text: MiniLM token states at the input of the first joint layer (fp16), the attention
    mask, and the L2-normalised mean-pooled sentence embedding (MiniLM's own output)."""
    tok, model = _load_minilm(path)
    n_layers = model.config.num_hidden_layers
    if not 1 <= joint_layers <= n_layers:
        raise UserError(f"teacher_joint_layers must lie in 1..{n_layers}, got {joint_layers}")
    states, masks, embs = [], [], []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding="max_length", truncation=True, max_length=max_tokens,
                  return_tensors="pt")
        out = model(**enc, output_hidden_states=True)
        h, m = out.last_hidden_state, enc["attention_mask"].bool()
        embs.append(F.normalize(_pool(h, m), dim=-1))
        states.append(out.hidden_states[n_layers - joint_layers].half())
        masks.append(m)
    return torch.cat(states), torch.cat(masks), torch.cat(embs)


def minilm_joint_layers(joint_layers: int, path=None) -> nn.ModuleList:
    """MiniLM's top `joint_layers` layers as `BertPairLayer`s (pre-trained weights)."""
    _, model = _load_minilm(path)
    cfg = model.config
    return nn.ModuleList(BertPairLayer.from_hf(layer, cfg.num_attention_heads, cfg.layer_norm_eps)
                         for layer in model.encoder.layer[cfg.num_hidden_layers - joint_layers:])


class MiniLMCrossEncoder(nn.Module):
    """Pair scorer: joint MiniLM layers over [example ; gloss] -> interaction logit, + scaled ITC cosine.

    The ITC part is zero-shot MiniLM's cosine times a fixed `itc_scale`; it is not trained. Training it
    too (residual heads on the sentence embeddings, as the student has) lowered validation re-ranking
    within a few hundred steps on the quick profile's data (peak 44.4% vs 46.0% frozen, then 39.5%).
    """

    def __init__(self, layers: nn.ModuleList, d: int = 384, itc_scale: float = 20.0):
        super().__init__()
        self.layers = copy.deepcopy(layers)
        self.segment = nn.Parameter(torch.zeros(d))  # added to gloss tokens; zero = MiniLM as it is
        self.head = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
        nn.init.zeros_(self.head[-1].weight)  # start from the ITC score alone
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("itc_scale", torch.tensor(float(itc_scale)))

    def encoder_parameters(self):
        return self.layers.parameters()

    def head_parameters(self):
        mine = {id(p) for p in self.encoder_parameters()}
        return [p for p in self.parameters() if id(p) not in mine]

    def forward(self, qs, qm, qe, gs, gm, ge) -> torch.Tensor:
        """Aligned pairs: token states [n, L, d] (fp16 ok), masks [n, L], sentence embeddings [n, d]."""
        x = torch.cat([qs.float(), gs.float() + self.segment], 1)
        keep = torch.cat([qm, gm], 1)
        for layer in self.layers:
            x = layer(x, keep)
        lq = qm.shape[1]
        pq, pg = _pool(x[:, :lq], qm), _pool(x[:, lq:], gm)
        itc = (F.normalize(qe.float(), dim=-1) * F.normalize(ge.float(), dim=-1)).sum(-1)
        return self.head(torch.cat([pq, pg, pq * pg], -1)).squeeze(-1) + self.itc_scale * itc


def score_pairs(teacher: MiniLMCrossEncoder, enc, q_idx: torch.Tensor, g_idx: torch.Tensor,
                chunk: int = 1024) -> torch.Tensor:
    """No-grad teacher logits for the pairs (text q_idx[i], text g_idx[i]), in chunks."""
    st, mk, em = enc
    out = []
    with torch.no_grad():
        for i in range(0, len(q_idx), chunk):
            q, g = q_idx[i:i + chunk], g_idx[i:i + chunk]
            out.append(teacher(st[q], mk[q], em[q], st[g], mk[g], em[g]))
    return torch.cat(out) if out else torch.zeros(0)


def rerank_r1(teacher, enc, q_idx, cand, hit) -> float:
    """% of queries whose teacher-top candidate is correct; cand [n, C] text ids, hit [n, C] bool."""
    scores = score_pairs(teacher, enc, q_idx[:, None].expand_as(cand).reshape(-1), cand.reshape(-1))
    best = scores.reshape(cand.shape).argmax(1, keepdim=True)
    return 100.0 * hit.gather(1, best).float().mean().item()


def fine_tune_teacher(teacher: MiniLMCrossEncoder, enc, train_q, train_g, val, *, steps: int, queries: int,
                      negatives: int, pool: int, lr: float, encoder_lr: float, eval_every: int, seed: int,
                      progress=lambda it, desc: it):
    """Softmax over (1 positive + `negatives` hard negatives) per example; keeps the best validation
    checkpoint. `val` = (query ids, candidate ids [n, C], hit [n, C]).

    The hard negatives of a step are the glosses zero-shot MiniLM ranks highest among a fresh random
    pool of `pool` training glosses. The pool sets their difficulty to that of the galleries the
    teacher scores later (student batches of tens of synsets, test galleries of hundreds). Mining
    the whole training set instead (thousands of glosses) returns negatives that mostly outrank the
    true gloss in MiniLM's space, and a teacher fitted to those learnt to invert MiniLM's similarity
    (measured: validation re-rank R@1 fell from 42% to 14%).

    Returns (teacher, report) with the validation re-rank R@1 at step 0 (zero-shot MiniLM) and at the
    kept step.
    """
    em = enc[2]
    glosses, g_of = torch.unique(train_g, return_inverse=True)  # examples of one synset share a gloss
    if len(glosses) <= pool or pool <= negatives:
        raise UserError(f"the teacher needs negatives ({negatives}) < pool ({pool}) < training glosses "
                        f"({len(glosses)})")
    opt = torch.optim.AdamW([{"params": list(teacher.encoder_parameters()), "lr": encoder_lr},
                             {"params": teacher.head_parameters(), "lr": lr}])
    g = torch.Generator().manual_seed(seed)
    best = (rerank_r1(teacher.eval(), enc, *val), 0, copy.deepcopy(teacher.state_dict()))
    history = [(0, best[0])]
    for step in progress(range(1, steps + 1), desc="teacher"):
        teacher.train()
        b = torch.randint(len(train_q), (queries,), generator=g)
        gallery = torch.randperm(len(glosses), generator=g)[:pool]
        sim = em[train_q[b]] @ em[glosses[gallery]].t()
        sim[gallery[None, :] == g_of[b][:, None]] = float("-inf")  # a query's own gloss is no negative
        cand = torch.cat([g_of[b][:, None], gallery[sim.topk(negatives, dim=1).indices]], 1)  # col 0 = positive
        q = train_q[b][:, None].expand_as(cand).reshape(-1)
        gl = glosses[cand].reshape(-1)
        logits = teacher(enc[0][q], enc[1][q], em[q], enc[0][gl], enc[1][gl], em[gl]).reshape(cand.shape)
        loss = F.cross_entropy(logits, torch.zeros(queries, dtype=torch.long))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            r1 = rerank_r1(teacher.eval(), enc, *val)
            history.append((step, r1))
            if r1 > best[0]:
                best = (r1, step, copy.deepcopy(teacher.state_dict()))
    teacher.load_state_dict(best[2])
    report = {"teacher_val_R@1_zero_shot": history[0][1], "teacher_val_R@1": best[0], "teacher_step": best[1],
              "teacher_val_history": history}
    return teacher.eval(), report
