"""The command line's data and helper pieces: tokenisers, corpora, batches, the learning-rate
schedule, optimizer-state files, the compared architectures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsmoe.cli import checkpoint as ckpt
from dsmoe.cli.common import CLIError, MetricsLog, check_run_dir, format_table
from dsmoe.cli.data import (
    BYTE_VOCAB_SIZE,
    EOS_ID,
    ByteTokenizer,
    HFTokenizer,
    eval_batches,
    iter_documents,
    load_token_data,
    load_tokenizer,
    split_documents,
    train_batch,
)
from dsmoe.cli.models import compare_configs, make_config, parameter_counts
from dsmoe.cli.train import lr_at

TEXT = "def f(x):\n    return 'héllo €' + x  # ünïcödé 🙂\n"


def test_byte_tokenizer_round_trip_and_tokenizer_json(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    tok.save(tmp_path)
    hf = HFTokenizer(tmp_path / "tokenizer.json")
    # the saved tokenizer.json (read by the tokenizers package) is the same tokenisation
    assert hf.encode(TEXT) == ids
    assert hf.decode(ids) == TEXT
    assert hf.vocab_size == BYTE_VOCAB_SIZE
    assert hf.tok.token_to_id("<|eos|>") == EOS_ID
    # a checkpoint folder with that file gets the fast byte tokenizer back
    assert isinstance(load_tokenizer(tmp_path, BYTE_VOCAB_SIZE), ByteTokenizer)


def test_stream_decoders_hold_back_partial_characters(tmp_path):
    ids = ByteTokenizer().encode(TEXT)
    for tok in (ByteTokenizer(), None):
        if tok is None:
            ByteTokenizer().save(tmp_path)
            tok = HFTokenizer(tmp_path / "tokenizer.json")
        dec = tok.stream_decoder()
        pieces = [dec.push(i) for i in ids] + [dec.flush()]
        assert "".join(pieces) == TEXT
        assert all("\ufffd" not in p for p in pieces)


def test_foreign_tokenizer_json_is_used_as_is(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "<s>": 3}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path, vocab_size=8, bos_id=3, eos_id=None)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world") == [1, 2]
    with pytest.raises(ValueError, match="vocab_size"):
        load_tokenizer(tmp_path, vocab_size=3)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path, vocab_size=32000)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path, vocab_size=32000)


def test_default_corpus_is_the_stdlib_and_split_is_deterministic():
    desc, docs = iter_documents(None)
    assert "stdlib" in desc and len(docs) > 100
    names = [d.name for d in docs]
    assert names == sorted(names) and all(n.endswith(".py") for n in names)
    assert not any("site-packages" in n for n in names)
    train, val = split_documents(docs)
    assert len(val) > 0 and len(train) > 10 * len(val)
    train2, val2 = split_documents(iter_documents(None)[1])
    assert [len(v) for v in val] == [len(v) for v in val2]


def test_folder_and_file_data(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta " * 50)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").write_text("never")
    desc, docs = iter_documents(str(tmp_path))
    assert [d.name for d in docs] == ["a.txt", "sub/b.md"]
    data = load_token_data(str(tmp_path), ByteTokenizer())
    # few documents: the last 5 % of each is validation; each document ends with <|eos|>
    assert len(data.train) + len(data.val) == 300 + 250 + 4
    assert int((data.train == EOS_ID).sum()) == 2 and int((data.val == EOS_ID).sum()) == 2
    one = load_token_data(str(tmp_path / "a.txt"), ByteTokenizer())
    assert one.num_docs == 1
    for bad in (tmp_path / "missing", tmp_path / "blob.bin"):
        with pytest.raises(CLIError, match="--data"):
            load_token_data(str(bad), ByteTokenizer())


def test_batches_are_a_function_of_seed_and_step():
    tokens = torch.arange(1000, dtype=torch.int16) % 256
    x1, y1 = train_batch(tokens, step=3, seed=1, batch_size=4, seq_len=16)
    x2, y2 = train_batch(tokens, step=3, seed=1, batch_size=4, seq_len=16)
    x3, _ = train_batch(tokens, step=4, seed=1, batch_size=4, seq_len=16)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert x1.dtype == torch.int64 and x1.shape == (4, 16)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    ev = list(eval_batches(tokens, 2, 16, 3))
    assert len(ev) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(ev, eval_batches(tokens, 2, 16, 3)))
    with pytest.raises(CLIError, match="seq-len"):
        train_batch(tokens[:10], 0, 0, 2, 16)


def test_lr_schedule_warmup_then_cosine():
    a = dict(lr=1e-3, warmup=10, min_lr=1e-4, steps=110)
    lrs = [lr_at(s, a) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lrs[:10], lrs[1:10]))
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:]))
    assert lrs[10] == pytest.approx(1e-3) and lr_at(110, a) == pytest.approx(1e-4)
    assert lr_at(60, a) == pytest.approx(5.5e-4)  # half way through the cosine


def test_optimizer_state_round_trips_through_safetensors_files(tmp_path):
    from safetensors.torch import load_file, save_file

    p = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW([{"params": [p[0]], "weight_decay": 0.1}, {"params": [p[1]], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        (p[0].sum() ** 2 + p[1].pow(3).sum()).backward()
        opt.step()
        opt.zero_grad()
    tensors, meta = ckpt.optimizer_to_files(opt)
    save_file(tensors, str(tmp_path / "o.safetensors"))
    import json

    meta = json.loads(json.dumps(meta))  # what trainer_state.json holds
    restored = ckpt.optimizer_from_files(load_file(str(tmp_path / "o.safetensors")), meta)
    q = [torch.nn.Parameter(t.detach().clone()) for t in p]
    opt2 = torch.optim.AdamW([{"params": [q[0]]}, {"params": [q[1]]}], lr=0.0)
    opt2.load_state_dict(restored)
    for a, b in ((opt, p), (opt2, q)):
        (b[0].sum() ** 2 + b[1].pow(3).sum()).backward()
        a.step()
    assert all(torch.equal(x, y) for x, y in zip(p, q))


def test_compare_variants_match_flops_and_params():
    cfgs = compare_configs()
    counts = {n: parameter_counts(make_config(f"compare-{n}")) for n in cfgs}
    dense, gshard, ds = counts["dense"], counts["gshard"], counts["deepseekmoe"]
    # activated: equal up to the routers (E x hidden per layer)
    h, L = 128, 4
    assert gshard[1] - dense[1] == 16 * h * L
    assert ds[1] - dense[1] == 63 * h * L
    # total: the two MoEs differ only by their routers
    assert ds[0] - gshard[0] == (63 - 16) * h * L
    assert cfgs["deepseekmoe"]["num_experts_per_tok"] == 7 and cfgs["deepseekmoe"]["n_shared_experts"] == 1
    # GShard normalises its top-2 gates (its paper's Algorithm 1); DeepSeekMoE does not (its paper)
    assert cfgs["gshard"]["norm_topk_prob"] is True and cfgs["deepseekmoe"]["norm_topk_prob"] is False
    with pytest.raises(CLIError, match="granularity"):
        compare_configs(ffn=30, granularity=4)


def test_metrics_log_truncates_on_resume(tmp_path):
    log = MetricsLog(tmp_path)
    for s in range(1, 6):
        log.add(step=s, split="train", loss=1.0 / s)
    again = MetricsLog(tmp_path, keep_until=3)
    assert [r["step"] for r in again.rows] == [1, 2, 3]
    assert (tmp_path / "log.csv").read_text().count("\n") == 4


def test_run_dir_and_table_helpers(tmp_path):
    check_run_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(CLIError, match="already exists"):
        check_run_dir(tmp_path / "full", overwrite=False)
    check_run_dir(tmp_path / "full", overwrite=True)
    assert (tmp_path / "full" / "x").read_text() == "keep"
    table = format_table(["a", "b"], [["x", 1.5], ["yy", float("nan")]])
    assert table.splitlines()[2].startswith("x ") and table.splitlines()[3].endswith("-")


# ------------------------------------------------------------------- corpora and batches in detail
# (what the mutation pass over dsmoe/cli/data.py found unchecked: docs/mutation_testing.md)

def test_walk_order_skips_and_suffixes(tmp_path, monkeypatch):
    from dsmoe.cli import data as data_mod

    for name in ("a/x.py", "a-b.py", "a/.hid.py", "b/site-packages/s.py", "b/__pycache__/c.py", "b/dist-packages/d.py",
                 ".git/g.py", "b/y.txt", "b/z.py", "unreadable/u.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "a")  # a linked folder is not followed (no cycles, no doubles)
    (tmp_path / "f.py.lnk").symlink_to(tmp_path / "b" / "z.py")  # a linked file is read
    real = Path.iterdir

    def iterdir(self):
        if self.name == "unreadable":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    rel = lambda files: [p.relative_to(tmp_path).as_posix() for p in files]  # noqa: E731
    # ordered by the relative path as text: "a-b.py" before "a/x.py" ('-' < '/')
    assert rel(data_mod._walk_files(tmp_path, (".py",))) == ["a-b.py", "a/x.py", "b/z.py"]
    assert rel(data_mod._walk_files(tmp_path, None)) == ["a-b.py", "a/x.py", "b/y.txt", "b/z.py", "f.py.lnk"]


def test_validation_documents_are_one_in_twenty_by_name():
    from dsmoe.cli import data as data_mod

    names = [f"doc{i}.txt" for i in range(4000)]
    val = [n for n in names if data_mod._is_val(n)]
    assert 150 <= len(val) <= 250  # 5 % of 4000 = 200
    assert [n for n in names if data_mod._is_val(n)] == val  # a function of the name only
    # pinned: which documents validate must never change between versions (resumed and compared
    # runs would read other data); crc32 of the UTF-8 name, mod 20, == 0
    assert [n for n in names[:80] if data_mod._is_val(n)] == ["doc0.txt", "doc1.txt", "doc2.txt", "doc74.txt",
                                                              "doc77.txt"]
    assert not data_mod._is_val("doc61.txt")  # crc32 % 20 == 1


def test_document_rules(tmp_path, monkeypatch):
    from dsmoe.cli import data as data_mod

    (tmp_path / "late-nul.txt").write_bytes(b"a" * 8192 + b"\x00")  # NUL only past the first 8 KiB: text
    (tmp_path / "early-nul.bin").write_bytes(b"a" * 8191 + b"\x00")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "locked.txt").write_text("secret")
    (tmp_path / "z.txt").write_text("read after the unreadable one")
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    desc, docs = data_mod.iter_documents(str(tmp_path))
    assert desc == str(tmp_path) and [d.name for d in docs] == ["late-nul.txt", "z.txt"]  # unreadable one skipped
    with pytest.raises(CLIError) as e:
        data_mod.iter_documents(str(tmp_path / "locked.txt"))
    assert str(e.value) == f"--data: cannot read {tmp_path / 'locked.txt'}: Permission denied"
    for bad, message in [(tmp_path / "missing", "does not exist"), (tmp_path / "empty.txt", "no text found in"),
                         (tmp_path / "early-nul.bin", "no text found in")]:
        with pytest.raises(CLIError) as e:
            data_mod.iter_documents(str(bad))
        assert str(e.value) == {"does not exist": f"--data: {bad} does not exist"}.get(message, f"--data: {message} {bad}")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CLIError) as e:
        data_mod.iter_documents(str(tmp_path / "fifo"))
    assert str(e.value) == f"--data: {tmp_path / 'fifo'} is neither a file nor a folder"


def test_default_corpus_refusals(tmp_path, monkeypatch):
    from dsmoe.cli import data as data_mod

    monkeypatch.setattr(data_mod, "stdlib_root", lambda: tmp_path / "gone")
    with pytest.raises(CLIError) as e:
        data_mod.iter_documents(None)
    assert str(e.value) == (f"the default corpus needs the standard library sources, not found at {tmp_path / 'gone'}; "
                            "pass --data")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "notes.txt").write_text("no .py here")
    monkeypatch.setattr(data_mod, "stdlib_root", lambda: tmp_path / "lib")
    with pytest.raises(CLIError) as e:
        data_mod.iter_documents(None)
    assert str(e.value) == f"--data: no text found in {tmp_path / 'lib'}"
    (tmp_path / "lib" / "m.py").write_text("x = 1\n")
    desc, docs = data_mod.iter_documents(None)
    assert desc == f"python stdlib sources ({tmp_path / 'lib'})" and [d.name for d in docs] == ["m.py"]


def test_stdlib_root_is_this_pythons():
    import sysconfig

    from dsmoe.cli import data as data_mod

    assert data_mod.stdlib_root() == Path(sysconfig.get_paths()["stdlib"])
    assert (data_mod.stdlib_root() / "os.py").is_file()


def test_split_documents_cuts(tmp_path):
    from dsmoe.cli.data import Document, _is_val

    few = [Document("a", b"x" * 100), Document("b", b"y" * 10), Document("c", b"z")]
    train, val = split_documents(few)
    assert train == [b"x" * 95, b"y" * 9, b""] and val == [b"x" * 5, b"y", b"z"]  # the last 5 %, at least 1 byte
    many = [Document(f"d{i}", bytes([65 + i % 26]) * 3) for i in range(40)]
    train, val = split_documents(many)
    assert val == [d.data for d in many if _is_val(d.name)] and len(val) >= 1
    assert train == [d.data for d in many if not _is_val(d.name)]
    # enough documents but none falls into validation: per-document tails instead
    none_val = [d for d in (Document(f"n{i}", b"ab" * 20) for i in range(200)) if not _is_val(d.name)][:40]
    train, val = split_documents(none_val)
    assert val == [b"ab"] * 40 and train == [b"ab" * 19] * 40
    train, val = split_documents(none_val[:39])  # fewer than 40: tails too
    assert len(val) == 39
    # fewer than 40 documents, one of them a validation name: still per-document tails
    few = [Document("doc0.txt", b"v" * 40), Document("doc61.txt", b"t" * 40)]
    assert split_documents(few) == ([b"v" * 38, b"t" * 38], [b"vv", b"tt"])


def test_tokenize_documents_marks_ends_and_truncates():
    from dsmoe.cli.data import tokenize_documents

    tok = ByteTokenizer()
    ids = tokenize_documents([b"ab", b"c"], tok)
    assert ids.tolist() == [97, 98, EOS_ID, 99, EOS_ID] and ids.dtype == torch.int16
    assert tokenize_documents([b"ab", b"cd", b"ef"], tok, max_tokens=4).tolist() == [97, 98, EOS_ID, 99]
    assert tokenize_documents([b"ab", b"c"], tok, max_tokens=3).tolist() == [97, 98, EOS_ID]
    assert tokenize_documents([], tok).tolist() == [] and tokenize_documents([], tok).dtype == torch.int16

    class Counting(ByteTokenizer):
        calls = 0

        def encode_bytes(self, data):
            Counting.calls += 1
            return super().encode_bytes(data)

    # documents past max_tokens are not even tokenised (the default corpus is large)
    for max_tokens, calls in ((3, 1), (4, 2), (6, 2), (7, 3)):
        Counting.calls = 0
        ids = tokenize_documents([b"ab", b"cd", b"ef", b"gh"], Counting(), max_tokens=max_tokens)
        assert Counting.calls == calls and len(ids) == max_tokens, max_tokens

    class Big:  # a large vocabulary without an end-of-text token
        vocab_size = 2**15

        def encode_bytes(self, blob):
            import numpy as np

            return np.array([40000 + b for b in blob], dtype=np.int32)

    big = tokenize_documents([b"\x01\x02", b"\x03"], Big())
    assert big.tolist() == [40001, 40002, 40003] and big.dtype == torch.int32
    Big.vocab_size = 2**15 - 1
    assert tokenize_documents([b"\x01"], Big()).dtype == torch.int16


def test_load_token_data_passes_its_limit_and_description(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.txt").write_text("beta " * 50)
    data = load_token_data(str(tmp_path), ByteTokenizer(), max_tokens=7)
    assert len(data.train) == 7 and len(data.val) == 7 and data.description == str(tmp_path) and data.num_docs == 2
    assert data.train.tolist() == list(b"alpha a")


def test_token_data_summary():
    from dsmoe.cli.data import TokenData

    data = TokenData(torch.zeros(12345, dtype=torch.int16), torch.zeros(678, dtype=torch.int16), "corpus", 3)
    assert data.summary() == "corpus: 3 documents, 12,345 train / 678 val tokens"


def test_batch_windows_in_detail():
    from dsmoe.cli.data import _check_len

    tokens = torch.arange(100, dtype=torch.int16)
    # the generator of step s under seed k is seeded with k * 1_000_003 + s (mod 2**63)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 5)
    starts = torch.randint(0, 100 - 8, (3,), generator=g)
    x, y = train_batch(tokens, step=5, seed=7, batch_size=3, seq_len=8)
    assert x.tolist() == [list(range(s, s + 8)) for s in starts.tolist()]
    assert y.tolist() == [list(range(s + 1, s + 9)) for s in starts.tolist()]
    big_seed = 2**63 - 1
    g = torch.Generator().manual_seed((big_seed * 1_000_003 + 2) % 2**63)
    assert train_batch(tokens, 2, big_seed, 2, 8)[0][:, 0].tolist() == torch.randint(0, 92, (2,), generator=g).tolist()
    # every start possible, up to len - seq_len - 1 (the target of the last window is the last token)
    seen = set()
    for step in range(400):
        seen.update(train_batch(tokens[:12], step, 0, 4, 10)[0][:, 0].tolist())
    assert seen == {0, 1}
    x, y = train_batch(tokens[:11], 0, 0, 2, 10)  # exactly seq_len + 1 tokens: the one window
    assert x.tolist() == [list(range(10))] * 2 and y.tolist() == [list(range(1, 11))] * 2
    with pytest.raises(CLIError) as e:
        _check_len(tokens[:10], 10, "validation")
    assert str(e.value) == ("the validation split has 10 tokens, fewer than --seq-len + 1 = 11; "
                            "use more data or a shorter --seq-len")
    with pytest.raises(CLIError, match="^the validation split has 10 tokens"):
        next(eval_batches(tokens[:10], 1, 10, 1))
    with pytest.raises(CLIError, match="^the train split has 10 tokens"):
        train_batch(tokens[:10], 0, 0, 1, 10)


def test_eval_windows_spread_evenly():
    tokens = torch.arange(100, dtype=torch.int16)
    batches = list(eval_batches(tokens, 2, 10, 3))
    starts = [row[0] for x, _ in batches for row in x.tolist()]
    assert starts == [0, 17, 35, 53, 71, 89]  # linspace(0, 89, 6), truncated
    assert all(x.shape == (2, 10) and torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    assert batches[-1][1][-1].tolist() == list(range(90, 100))  # the last window ends at the last token
