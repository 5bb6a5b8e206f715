"""Benchmark `emoe-layer`: is the sparse EMoE FFN faster than the dense FFN it came from?

Per configuration (d, d_ff, T, N, k) we time forward-only and forward+backward of
- the sparse path ("auto", plus every other sparse path on CUDA),
- two baselines in the same process: the dense FFN with the same weights and the masked reference path.
EMoE timings include what the layer really runs on top of the FFN: the avg-k gate scores (x @ G.T, G = mean of
each expert's key rows) and top-k. Ratios are dense time / EMoE time ("speedup").

The Llama-sized CUDA configs (d_ff 11008 / 14336) use a GLU FFN with SiLU, the others GELU with a bias.
End-to-end lines (when transformers is installed) time a training step with EMoE FFNs against the same model
dense: a MiniLM-sized BERT with random weights, the real all-MiniLM-L6-v2 through `emoe.convert`, and on CUDA
a Llama-architecture model (hidden 2048, d_ff 5632, 16 layers), reporting tokens/s.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..core.bench import Comparison, time_pair
from ..core.registry import register_benchmark
from .kernels import expert_ffn, triton_available

CPU_SHAPES = [(384, 1536, 4096)]
CUDA_SHAPES = [(768, 3072, 16384), (1024, 4096, 16384), (4096, 11008, 8192), (4096, 14336, 8192)]
EXPERTS = [(16, 4), (64, 16), (32, 8)]


def _targets(device: str, d: int, d_ff: int, N: int, k: int) -> tuple[float | None, float | None]:
    """(forward target, forward+backward target), set only for k/N = 1/4 (docs/emoe_performance.md)."""
    if 4 * k != N:
        return None, None
    if device == "cpu":
        return 1.2, None
    if (d, d_ff) == (1024, 4096):
        return 1.5, 1.3
    if d_ff in (11008, 14336):
        return None, 2.0
    return None, None


class _FFN:
    """One FFN's weights and three ways to run it on the same input."""

    def __init__(self, d, d_ff, T, N, k, dtype, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def r(*s, scale):
            return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(True)

        self.glu = d_ff in (11008, 14336)
        self.act = F.silu if self.glu else F.gelu
        self.N, self.k, self.m = N, k, d_ff // N
        self.x = r(T, d, scale=1.0)
        self.w_in, self.w_out = r(d_ff, d, scale=d ** -0.5), r(d, d_ff, scale=d_ff ** -0.5)
        self.b_in = None if self.glu else r(d_ff, scale=0.1)
        self.w_gate = r(d_ff, d, scale=d ** -0.5) if self.glu else None
        self.grad = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)

    def dense(self):
        h = F.linear(self.x, self.w_in, self.b_in)
        h = self.act(F.linear(self.x, self.w_gate)) * h if self.glu else self.act(h)
        return F.linear(h, self.w_out)

    def emoe(self, impl):
        with torch.no_grad():  # avg-k gate: frozen, recomputed from the live keys (Llama: gate_proj)
            keys = self.w_gate if self.glu else self.w_in
            G = keys.view(self.N, self.m, -1).mean(1)
            idx = (self.x @ G.t()).float().topk(self.k, dim=1).indices
        return expert_ffn(self.x, self.w_in, self.b_in, self.w_out, idx, self.N, self.act,
                          w_glu_gate=self.w_gate, impl=impl)

    def runner(self, impl):
        return self.dense if impl == "dense" else (lambda: self.emoe(impl))

    def fwd(self, f):
        def run():
            with torch.no_grad():
                f()
        return run

    def fwd_bwd(self, f):
        def run():
            for t in (self.x, self.w_in, self.b_in, self.w_out, self.w_gate):
                if t is not None:
                    t.grad = None
            f().backward(self.grad)
        return run


def _layer_rows(device: str, quick: bool) -> list[Comparison]:
    rows = []
    cuda = device.startswith("cuda")
    shapes, dtype = (CUDA_SHAPES, torch.bfloat16) if cuda else (CPU_SHAPES, torch.float32)
    impls = ["auto"]
    if cuda:
        impls += ["gather", "grouped_mm"] + (["triton"] if triton_available(torch.device(device)) else [])
    # clock='auto': a one-thread CPU run reads process CPU time (core.bench.time_fn), as wall time here
    # measured the neighbours
    kw = dict(warmup=1, repeat=3, device=device, clock="auto") if not cuda else dict(warmup=3, repeat=10, device=device)
    rounds = 2 if not cuda else 3
    for d, d_ff, T in shapes:
        for N, k in EXPERTS[:1] if quick else EXPERTS:
            ffn = _FFN(d, d_ff, T, N, k, dtype, device)
            t_fwd, t_fb = _targets("cuda" if cuda else "cpu", d, d_ff, N, k)
            tag = f"{'cuda bf16' if cuda else 'cpu fp32'} d={d} d_ff={d_ff} T={T} N={N} k={k}"
            for mode, wrap, target in (("fwd", ffn.fwd, t_fwd), ("fwd+bwd", ffn.fwd_bwd, t_fb)):
                dense = wrap(ffn.runner("dense"))
                masked_t, dense_t = time_pair(wrap(ffn.runner("masked")), dense, rounds=rounds, **kw)
                rows.append(Comparison(f"{tag} {mode}", "emoe masked", "dense FFN", masked_t, dense_t,
                                       None, "speedup"))
                for impl in impls:
                    try:
                        cand_t, dense_t = time_pair(wrap(ffn.runner(impl)), dense, rounds=rounds, **kw)
                    except Exception as e:  # a path that does not run on this GPU/torch is reported, not fatal
                        rows.append(Comparison(f"{tag} {mode}", f"emoe {impl}", "dense FFN", float("nan"), None,
                                               None, "speedup", note=f"failed: {type(e).__name__}: {e}"[:200]))
                        continue
                    rows.append(Comparison(f"{tag} {mode}", f"emoe {impl}", "dense FFN", cand_t, dense_t,
                                           target, "speedup"))
            ffn = None  # free this config's tensors before the next is allocated
            if cuda:
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# End to end: a MiniLM-sized BERT training step, EMoE FFNs vs dense.


def _emoe_feed_forward(layer, N: int, k: int, impl: str):
    """A BertLayer.feed_forward_chunk that runs its FFN through `expert_ffn` (contiguous experts, avg-k gate).

    The bench does not cluster (random weights have no structure to find); speed does not depend on which
    neurons form an expert.
    """
    inter, out = layer.intermediate.dense, layer.output

    def chunk(attn):
        x = attn.reshape(-1, attn.shape[-1])
        with torch.no_grad():
            G = inter.weight.view(N, inter.weight.shape[0] // N, -1).mean(1)
            idx = (x @ G.t()).float().topk(k, dim=1).indices
        y = expert_ffn(x, inter.weight, inter.bias, out.dense.weight, idx, N, F.gelu, impl=impl)
        y = (y + out.dense.bias).view_as(attn)
        return out.LayerNorm(out.dropout(y) + attn)

    return chunk


def _bert_rows(device: str, quick: bool) -> list[Comparison]:
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        return []
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cuda = device.startswith("cuda")
    B, S = (64, 128) if cuda else (16, 128)
    N, k = 16, 4
    torch.manual_seed(0)
    model = BertModel(cfg).to(device).train()
    dense_ff = [layer.feed_forward_chunk for layer in model.encoder.layer]
    emoe_ff = [_emoe_feed_forward(layer, N, k, "auto") for layer in model.encoder.layer]
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(0)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # one model: both arms step the same weights

    def step(layers):
        def run():
            for i, layer in enumerate(model.encoder.layer):
                layer.feed_forward_chunk = emoe_ff[i] if i in layers else dense_ff[i]
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
            opt.step()
        return run

    kw = dict(warmup=2, repeat=5, device=device) if cuda else dict(warmup=1, repeat=2, device=device, clock="auto")
    rows = []
    # (2, 4): the spec's reference experiment converts layer 4, or 2 and 4; all six layers bounds the gain
    for layers in [(2, 4)] if quick else [(2, 4), tuple(range(cfg.num_hidden_layers))]:
        t_e, t_d = time_pair(step(layers), step(()), rounds=2, **kw)
        rows.append(Comparison(f"MiniLM-size BERT train step B={B} S={S}, EMoE N={N} k={k} on layers "
                               f"{list(layers)}", "emoe auto", "dense", t_e, t_d, None, "speedup"))
    return rows


def _minilm_rows(device: str, quick: bool) -> list[Comparison]:
    """The library end to end: the real all-MiniLM-L6-v2 converted by `transferlab.emoe.convert`
    (impl="auto"), one fine-tuning step (mean-pooled embedding, linear head, cross-entropy, AdamW) vs the
    unconverted model. split="contiguous" skips k-means: which neurons form an expert does not change speed."""
    try:
        from transformers import AutoModel

        from ..data import minilm_path
        from . import EMoEConfig, convert

        path = minilm_path()
    except Exception:  # transformers, the MiniLM package or the EMoE model code absent: nothing to time
        return []
    import copy

    cuda = device.startswith("cuda")
    B, S = (64, 128) if cuda else (16, 128)
    torch.manual_seed(0)
    dense = AutoModel.from_pretrained(path).to(device).train()
    ids = torch.randint(1000, dense.config.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))
    ids, labels = ids.to(device), torch.arange(B, device=device) % 4
    kw = dict(warmup=2, repeat=5, device=device) if cuda else dict(warmup=1, repeat=2, device=device, clock="auto")
    rows = []
    for layers in [(2, 4)] if quick else [(2, 4), "all"]:
        emoe = convert(copy.deepcopy(dense), EMoEConfig(num_experts=16, top_k=4, layers=layers, split="contiguous"))
        steps = {}
        for name, model in (("emoe", emoe), ("dense", dense)):
            head = torch.nn.Linear(model.config.hidden_size, 4).to(device)
            opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=3e-5)

            def run(model=model, head=head, opt=opt):
                opt.zero_grad(set_to_none=True)
                z = model(input_ids=ids).last_hidden_state.mean(1)
                F.cross_entropy(head(z), labels).backward()
                opt.step()

            steps[name] = run
        t_e, t_d = time_pair(steps["emoe"], steps["dense"], rounds=2, **kw)
        rows.append(Comparison(f"all-MiniLM-L6-v2 fine-tuning step B={B} S={S}, emoe.convert N=16 k=4 layers="
                               f"{layers}", "emoe auto", "dense", t_e, t_d, None, "speedup"))
    return rows


def _emoe_glu_forward(mlp, N: int, k: int, impl: str):
    """A LlamaMLP.forward through `expert_ffn`: experts are blocks of neurons, scored by the block mean of
    gate_proj(x) (the official Llama path's `select='gate'`)."""

    def forward(h):
        x = h.reshape(-1, h.shape[-1])
        with torch.no_grad():
            G = mlp.gate_proj.weight.view(N, -1, x.shape[1]).mean(1)
            idx = (x @ G.t()).float().topk(k, dim=1).indices
        y = expert_ffn(x, mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, idx, N, mlp.act_fn,
                       w_glu_gate=mlp.gate_proj.weight, impl=impl)
        if mlp.down_proj.bias is not None:
            y = y + mlp.down_proj.bias
        return y.view_as(h)

    return forward


def _llama_rows(device: str, quick: bool, hidden: int = 2048, d_ff: int = 5632, n_layers: int = 16,
                batch: tuple[int, int] = (4, 2048)) -> list[Comparison]:
    """The end-to-end GPU line: a random Llama-architecture model (hidden 2048, d_ff 5632, 16 layers),
    EMoE (N=64, k=16) on every second layer of the last half, training-step tokens/s vs the same model dense."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return []
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=n_layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    (B, S), N, k = batch, 64, 16
    torch.manual_seed(0)
    with torch.device(device):  # initialise 1.1B parameters on the GPU, not on the host
        model = LlamaForCausalLM(cfg).to(dtype=torch.bfloat16).train()
    layers = list(range(cfg.num_hidden_layers // 2, cfg.num_hidden_layers, 2))
    dense_fwd = {i: model.model.layers[i].mlp.forward for i in layers}
    emoe_fwd = {i: _emoe_glu_forward(model.model.layers[i].mlp, N, k, "auto") for i in layers}
    ids = torch.randint(0, cfg.vocab_size, (B, S), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # one model, one optimiser: both arms share weights

    def step(fwds):
        def run():
            for i in layers:
                model.model.layers[i].mlp.forward = fwds[i]
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        return run

    t_e, t_d = time_pair(step(emoe_fwd), step(dense_fwd), rounds=2, warmup=2, repeat=5, device=device)
    tok = B * S
    return [Comparison(f"Llama-arch h={hidden} d_ff={d_ff} {n_layers} layers train step B={B} S={S}, "
                       f"EMoE N={N} k={k} on layers {layers}", "emoe auto", "dense", t_e, t_d, None, "speedup",
                       note=f"tokens/s: emoe {tok / t_e:.0f}, dense {tok / t_d:.0f}")]


@register_benchmark("emoe-layer", "EMoE FFN execution paths vs the dense FFN (fwd, fwd+bwd) + a MiniLM-size "
                                  "training step; TRANSFERLAB_BENCH_QUICK=1 for one (N,k) per shape")
def bench_emoe_layer(device: str) -> list[Comparison]:
    quick = os.environ.get("TRANSFERLAB_BENCH_QUICK") == "1"
    rows = _layer_rows(device, quick)
    parts = [_bert_rows, _minilm_rows] + ([_llama_rows] if device.startswith("cuda") else [])
    for part in parts:  # an end-to-end model that fails (e.g. out of memory) is reported, the rest still runs
        try:
            rows += part(device, quick)
        except Exception as e:
            rows.append(Comparison(part.__name__.strip("_"), "emoe auto", "dense", float("nan"), None, None, "speedup",
                                   note=f"failed: {type(e).__name__}: {e}"[:200]))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows
