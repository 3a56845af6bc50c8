"""metrics.py's copy metric for text models: hashed windows against a plain substring
search written out here, planted spans, and a model that has memorised its corpus."""
import json
import random
import types

import numpy as np
import pytest

import data
import metrics
import train

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega river stone cloud ember frost meadow lantern harbor").split()


def word_lines(seed, lines, per_line=8):
    """Lines of words drawn at random: any 50 bytes of it say something no other seed's says."""
    r = random.Random(seed)
    return "".join(" ".join(r.choice(WORDS) for _ in range(per_line)) + ".\n" for _ in range(lines))


def brute_windows(text, train_text, span):
    """Which span-byte windows of text occur in train_text, by substring search."""
    return np.array([text[i:i + span] in train_text for i in range(len(text) - span + 1)], bool)


def brute_longest(text, train_text):
    """(length, start in text) of the longest common substring, by the textbook dynamic
    programme: run[j] is the length of the common suffix of text[:i] and train_text[:j]."""
    t = np.frombuffer(train_text, np.uint8)
    run, best = np.zeros(len(t) + 1, np.int64), (0, 0)
    for i, c in enumerate(text):
        run[1:] = np.where(t == c, run[:-1] + 1, 0)
        j = int(run.argmax())
        if run[j] > best[0]:
            best = (int(run[j]), i + 1 - int(run[j]))
    return best


def test_windows_bytes_and_longest_equal_a_substring_search():
    # Two letters and a 12-byte span: 4,096 possible windows, so some of a sample's windows
    # are in 3,000 bytes of train and some are not, and copies join across their ends.
    r = np.random.RandomState(0)
    train_text = bytes(r.choice([97, 98], 3000).astype(np.uint8))
    span = 12
    index = metrics.build_copy_index(train_text, span)
    assert len(index) == len({train_text[i:i + span] for i in range(len(train_text) - span + 1)})
    for k in range(3):
        sample = bytes(r.choice([97, 98], 400).astype(np.uint8))
        if k == 2:  # two long copies back to back, a seam no single find crosses
            sample = train_text[100:260] + train_text[2000:2090] + sample[:100]
        hits = metrics.copied_windows(sample, index, span)
        want = brute_windows(sample, train_text, span)
        assert np.array_equal(hits, want) and 0 < want.mean() < 1
        covered = np.zeros(len(sample), bool)  # the loop the difference array replaces
        for i in np.flatnonzero(want):
            covered[i:i + span] = True
        assert np.array_equal(metrics.copied_bytes(hits, span, len(sample)), covered)
        best = metrics.longest_copy([sample], train_text, index, span)
        length, _ = brute_longest(sample, train_text)
        assert best["length"] == length and best["sample"] == 0
        piece = sample[best["sample_offset"]:best["sample_offset"] + length]
        assert train_text[best["train_offset"]:best["train_offset"] + length] == piece
        if k == 2:
            assert length >= 160


def test_hash_collisions_never_make_a_copy_of_the_longest(monkeypatch):
    # base 1 hashes a window to the sum of its bytes: most windows collide, and the
    # longest copy, confirmed by searching the text, must still be the true one (none
    # when no span-long piece is shared)
    monkeypatch.setattr(metrics, "HASH_BASE", np.uint64(1))
    r = np.random.RandomState(2)
    for _ in range(200):  # spans long enough that many samples share none with train
        span = int(r.randint(5, 9))
        train_text = bytes(r.choice([97, 98, 99, 100], 60).astype(np.uint8))
        sample = bytes(r.choice([97, 98, 99, 100], 40).astype(np.uint8))
        best = metrics.longest_copy([sample], train_text, metrics.build_copy_index(train_text, span), span)
        length, _ = brute_longest(sample, train_text)
        assert best["length"] == (length if length >= span else 0)


def test_a_planted_span_is_found_at_its_place_and_nothing_else():
    # train in lower case, the sample around the plant in upper case: no byte of the
    # surroundings can extend the match, so the copy is exactly the plant
    r = np.random.RandomState(1)
    train_text = bytes(r.randint(97, 123, 20000).astype(np.uint8))
    fresh = bytes(r.randint(65, 91, 1000).astype(np.uint8))
    sample = fresh[:400] + train_text[7000:7120] + fresh[520:]
    index = metrics.build_copy_index(train_text, 50)
    rows = metrics.copy_rows([sample, fresh], fresh, train_text, index, 50)
    assert rows["copied"] == 120 / 2000 and rows["copied_val"] == 0
    best = rows["longest_copy"]
    assert (best["length"], best["sample"], best["sample_offset"], best["train_offset"]) == (120, 0, 400, 7000)
    # a text shorter than the span has no windows and no copied byte
    assert metrics.copied_bytes(np.zeros(0, bool), 50, 3).tolist() == [False] * 3
    short_rows = metrics.copy_rows([b"abc"], b"", train_text, index, 50)
    assert short_rows["copied"] == 0 and short_rows["longest_copy"]["length"] == 0
    # shorter than the span, a plant is no copy
    short = fresh[:400] + train_text[7000:7049] + fresh[449:]
    assert metrics.copy_rows([short], fresh, train_text, index, 50)["copied"] == 0


def test_the_index_is_cached_keyed_by_the_source_and_rebuilt_when_it_changes(tmp_path):
    split = types.SimpleNamespace(cache_path=str(tmp_path / "cache" / "c-bytes-train.bin"), fingerprint="one")
    text, said = word_lines(0, 40).encode(), []
    first = metrics.copy_index(split, text, 50, log=said.append)
    again = metrics.copy_index(split, text, 50, log=said.append)
    assert len(said) == 1 and np.array_equal(first, again)  # built once, then read
    split.fingerprint = "two"  # the files changed: a new index, the old one gone
    other = word_lines(1, 40).encode()
    assert np.array_equal(metrics.copy_index(split, other, 50, log=said.append), metrics.build_copy_index(other, 50))
    assert len(said) == 2 and len(list((tmp_path / "cache").glob("*copy50*.npy"))) == 1


def test_bpe_text_keeps_documents_apart_with_a_nul():
    class FakeEnc:  # bytes as tokens, 256 ends a text
        name, n_vocab, eot_token = "fake", 257, 256

        def decode_bytes(self, ids):
            assert 256 not in ids
            return bytes(ids)
    tok = data.TiktokenTokenizer(FakeEnc())
    assert tok.decode_bytes(np.array([104, 105, 256, 106, 256, 107])) == b"hi\0j\0k"
    assert data.ByteTokenizer().decode_bytes(np.array([104, 105, 300, 106], np.uint16)) == b"hij"


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A GPT trained until greedy decoding recites its train text: 8 lines of words three
    times over (so a recital that runs past the end and starts again is still the text),
    and in the val split (a file whose name data.split_of sends there) 4 new lines."""
    tmp = tmp_path_factory.mktemp("mem")
    (tmp / "c").mkdir()
    (tmp / "c" / "recital.txt").write_text(word_lines(0, 8) * 3)
    assert data.split_of("recital.txt") == "train"
    held = next(f"new{i}.txt" for i in range(1000) if data.split_of(f"new{i}.txt") == "val")
    (tmp / "c" / held).write_text(word_lines(1, 4))
    assert train.main(["--model", "gpt", "--data", str(tmp / "c"), "--data-dir", str(tmp / "d"), "--out-dir",
                       str(tmp / "o"), "--block-size", "32", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
                       "--batch-size", "32", "--max-iters", "250", "--lr", "1e-2", "--warmup-iters", "20",
                       "--dtype", "fp32", "--dropout", "0", "--eval-interval", "250", "--eval-iters", "2",
                       "--log-interval", "250", "--sample-tokens", "0"]) == 0
    return tmp


def test_a_memorised_corpus_is_copied_and_new_text_is_not(memorised, capsys):
    ckpt = str(memorised / "o" / "ckpt.pt")
    assert metrics.main(["--ckpt", ckpt, "--temperature", "0", "--n", "2", "--max-new-tokens", "300",
                         "--nll-n", "4"]) == 0
    out = capsys.readouterr().out
    assert all(key in out for key in ("copied ", "copied_val", "longest_copy", "bits/byte"))
    rows = json.load(open(memorised / "o" / "metrics-text.json"))
    # a recital from any line is all train text (1.0 on AVX-512, AVX2 and default
    # kernels alike); a slipped byte uncovers itself at least, a jump up to 98 bytes
    assert rows["copied"] > 0.9
    # val is new lines of the same words: 50 bytes of 8 random words in a row recur among
    # train's 64 words with chance about 64 / 32^8, none
    assert rows["copied_val"] == 0
    best = rows["longest_copy"]
    train_text = (memorised / "c" / "recital.txt").read_bytes()  # the train split's one file
    assert best["length"] >= 200
    assert train_text[best["train_offset"]:best["train_offset"] + best["length"]] == best["text"].encode()
    # text from another source (other seeds' lines) against the same cached index
    split = data.load(str(memorised / "c"), data_dir=str(memorised / "d"), block_size=32)["train"]
    assert data.ByteTokenizer().decode_bytes(split.tokens) == train_text
    index = metrics.copy_index(split, train_text, 50, log=lambda m: pytest.fail(f"rebuilt: {m}"))
    others = [word_lines(seed, 8).encode() for seed in range(2, 6)]
    assert metrics.copy_rows(others, others[0], train_text, index, 50)["copied"] == 0


def test_text_flags_refuse_bad_values_in_one_line(memorised):
    ckpt = str(memorised / "o" / "ckpt.pt")
    for argv, says in ((["--copy-span", "0"], "--copy-span"), (["--top-p", "2"], "--top-p"),
                       (["--temperature", "-1"], "--temperature"), (["--prompt", ""], "--prompt")):
        with pytest.raises(metrics.UsageError, match=says):
            metrics.main(["--ckpt", ckpt, "--n", "2", "--nll-n", "0", "--max-new-tokens", "4", *argv])
