#!/usr/bin/env python3
"""The Python onnxruntime twin of `baton-embedbench` (run by `cargo xtask bench --embedder`).

Does the same work as Baton's Rust `Embedder`, with the same files and thread settings:
tokenize with the model's tokenizer.json (truncation 256 tokens, longest first; padding to
the longest text of each batch), run the int8 all-MiniLM-L6-v2 ONNX model with onnxruntime
(intra-op threads 2, inter-op threads 1, sequential execution, CPU provider), mean-pool the
`last_hidden_state` under the attention mask and L2-normalise, in numpy.

Prints, on stdout:

    first4 impl=python case=CASE [d0, d1, d2, d3]       the first text's first 4 dims
    check impl=python case=CASE min_cosine=...           with --check-against
    STAGES impl=python case=CASE batches=.. tokenize_ms=.. run_ms=.. pool_ms=..   with --stages
    RESULT impl=python case=CASE texts=N seconds=S texts_per_s=R

Benchmark-only: needs `onnxruntime==1.31.1`, `tokenizers`, `numpy` (the venv that
`cargo xtask bench --embedder` creates under `.baton/bench-venv`); never used by tests.
"""

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

OUTPUT = "last_hidden_state"


def load_tokenizer(path, max_tokens):
    tok = Tokenizer.from_file(path)
    # The shipped tokenizer.json pads and truncates to 128; sentence-transformers (and the
    # Rust Embedder) truncate to 256, longest first, and pad each batch to its longest text.
    padding = tok.padding or {}
    tok.enable_truncation(max_length=max_tokens, stride=0, strategy="longest_first", direction="right")
    tok.enable_padding(
        direction=padding.get("direction", "right"),
        pad_id=padding.get("pad_id", 0),
        pad_type_id=padding.get("pad_type_id", 0),
        pad_token=padding.get("pad_token", "[PAD]"),
        length=None,
        pad_to_multiple_of=None,
    )
    return tok


def load_session(path, threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


class PyEmbedder:
    def __init__(self, model, tokenizer, threads, max_tokens):
        self.tok = load_tokenizer(tokenizer, max_tokens)
        self.sess = load_session(model, threads)
        names = {i.name for i in self.sess.get_inputs()}
        self.token_type_ids = "token_type_ids" in names
        # Rust's `encode_batch_fast` (no offsets); older tokenizers lack it.
        self.encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)

    def tokenize(self, texts):
        enc = self.encode(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if self.token_type_ids:
            feeds["token_type_ids"] = np.array([e.type_ids for e in enc], dtype=np.int64)
        return feeds

    def run(self, feeds):
        return self.sess.run([OUTPUT], feeds)[0]

    @staticmethod
    def pool(hidden, mask):
        m = mask[:, :, None].astype(np.float32)
        mean = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
        norm = np.linalg.norm(mean, axis=1, keepdims=True)
        return mean / np.where(norm > 0.0, norm, 1.0)

    def embed(self, texts):
        feeds = self.tokenize(texts)
        return self.pool(self.run(feeds), feeds["attention_mask"])


def chunks(items, n):
    return [items[i : i + n] for i in range(0, len(items), n)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--inputs", required=True, help="one text per line")
    p.add_argument("--case", default="inputs")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--passes", type=int, default=3, help="timed passes over the inputs")
    p.add_argument("--warmup-passes", type=int, default=1)
    p.add_argument("--stages", action="store_true", help="time tokenize / run / pool apart")
    p.add_argument("--check-against", help="JSON {\"vectors\": [...]} from baton-embedbench --dump")
    p.add_argument("--min-cosine", type=float, default=0.999)
    a = p.parse_args()

    with open(a.inputs, encoding="utf-8") as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    emb = PyEmbedder(a.model, a.tokenizer, a.threads, a.max_tokens)
    batches = chunks(texts, a.batch)
    tag = f"impl=python case={a.case}"

    first = emb.embed(batches[0])
    print(f"first4 {tag} [{', '.join(f'{x:.6f}' for x in first[0][:4])}]")
    if a.check_against:
        with open(a.check_against, encoding="utf-8") as f:
            theirs = np.array(json.load(f)["vectors"], dtype=np.float32)
        ours = emb.embed(texts[: len(theirs)])
        cos = (ours * theirs).sum(axis=1) / (
            np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
        )
        print(f"check {tag} texts={len(cos)} min_cosine={cos.min():.7f}")
        if not (cos.min() > a.min_cosine):
            print(f"error: cosine {cos.min():.7f} <= {a.min_cosine} between the Rust and Python embeddings",
                  file=sys.stderr)
            return 2

    for _ in range(a.warmup_passes):
        for b in batches:
            emb.embed(b)

    if a.stages:
        tok_s = run_s = pool_s = 0.0
        n = 0
        for _ in range(a.passes):
            for b in batches:
                t0 = time.perf_counter()
                feeds = emb.tokenize(b)
                t1 = time.perf_counter()
                hidden = emb.run(feeds)
                t2 = time.perf_counter()
                emb.pool(hidden, feeds["attention_mask"])
                t3 = time.perf_counter()
                tok_s += t1 - t0
                run_s += t2 - t1
                pool_s += t3 - t2
                n += 1
        total = tok_s + run_s + pool_s
        print(
            f"STAGES {tag} batches={n} tokenize_ms={tok_s * 1e3 / n:.3f} run_ms={run_s * 1e3 / n:.3f} "
            f"pool_ms={pool_s * 1e3 / n:.3f} texts_per_s={len(texts) * a.passes / total:.1f}"
        )

    start = time.perf_counter()
    for _ in range(a.passes):
        for b in batches:
            out = emb.embed(b)
            assert out.shape == (len(b), 384)
    seconds = time.perf_counter() - start
    n = len(texts) * a.passes
    print(f"RESULT {tag} texts={n} seconds={seconds:.4f} texts_per_s={n / seconds:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
