"""The E2E scorer: the official scorer's numbers on its own example, the console script, mteval's rules, sacrebleu as
an oracle for BLEU, bad input, and a METEOR that cannot run (never a number under its name)."""
from __future__ import annotations

import csv
import json
import random
import shutil

import pytest

from lowrank_bench import e2e_metrics
from lowrank_bench.e2e_metrics import (JavaError, METRICS, main, mteval, mteval_tokenize, read_references, score,
                                       write_hypotheses, write_references)
from lowrank_bench.errors import LrbenchError
from tests.conftest import DATA, needs_data

EXAMPLE = DATA / "e2e-metrics-example" if DATA else None


def example():
    refs = read_references(EXAMPLE / "devel-conc.txt")
    hyps = e2e_metrics.read_hypotheses(EXAMPLE / "baseline-output.txt")
    expected = json.loads((EXAMPLE / "expected.json").read_text())
    return refs, hyps, expected


def fake_java(tmp_path, meteor_behaviour: str) -> str:
    """A `java` that runs the real one, except for the METEOR jar, which does `meteor_behaviour` instead."""
    real = e2e_metrics.java_executable()
    script = tmp_path / "java"
    script.write_text(f'#!/bin/bash\nfor a in "$@"; do case "$a" in *meteor-1.5.jar) {meteor_behaviour};; esac; done\n'
                      f'exec "{real}" "$@"\n')
    script.chmod(0o755)
    return str(script)


DIES_MID_EVALUATION = 'head -c 1 >/dev/null; echo "simulated crash" >&2; exit 3'


# -- conformance -------------------------------------------------------------------------------------------------
@needs_data
def test_five_metrics_equal_the_official_scorer_on_its_example():
    refs, hyps, expected = example()
    ours = score(refs, hyps)
    gaps = {m: f"ours {ours.get(m)} vs official {expected[m]} (gap {ours[m] - expected[m]:+.5f})" if m in ours
            else f"missing: {ours.get(e2e_metrics.error_key(m))}" for m in METRICS
            if m not in ours or round(ours[m], 4) != expected[m]}
    assert not gaps, gaps


@needs_data
def test_console_script_prints_the_five_scores_as_json_from_text_or_csv_references(tmp_path, capsys):
    refs, hyps, expected = example()
    assert main([str(EXAMPLE / "devel-conc.txt"), str(EXAMPLE / "baseline-output.txt"), "--digits", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == list(METRICS)
    assert printed == {m: expected[m] for m in METRICS}
    table = tmp_path / "refs.csv"  # the same references as a CSV, one row per reference
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_ALL)
        writer.writerow(["mr", "ref"])
        writer.writerows((f"name[MR {i}]", ref) for i, group in enumerate(refs) for ref in group)
    assert read_references(table) == refs
    assert main([str(table), str(EXAMPLE / "baseline-output.txt"), "--digits", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == printed


def test_written_files_read_back_unchanged(tmp_path):
    refs = [["A first one.", "A  second\none."], ["Only one here."]]
    hyps = ["hyp one", " hyp\ttwo "]
    write_references(tmp_path / "refs.txt", refs)
    write_hypotheses(tmp_path / "hyps.txt", hyps)
    assert read_references(tmp_path / "refs.txt") == [["A first one.", "A second one."], ["Only one here."]]
    assert e2e_metrics.read_hypotheses(tmp_path / "hyps.txt") == ["hyp one", "hyp two"]


# -- BLEU and NIST: mteval-v13a ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,words", [
    ("The Eagle is a pub, near Café Rouge.", ["the", "eagle", "is", "a", "pub", ",", "near", "café", "rouge", "."]),
    ("Prices are £20-25 and 3.5 stars, 1,000 fans", ["prices", "are", "£20", "-", "25", "and", "3.5", "stars", ",",
                                                      "1,000", "fans"]),
    ("It's kid-friendly &amp; \"cheap\"!", ["it's", "kid-friendly", "&", '"', "cheap", '"', "!"]),
    ("ÉCOLE (Riverside)", ["École", "(", "riverside", ")"]),  # ASCII lowercasing only, as tr/A-Z/a-z/
])
def test_mteval_tokenization_follows_the_perl_rules(text, words):
    assert mteval_tokenize(text) == words


def test_bleu_equals_sacrebleu_13a_on_ascii_text_with_equal_reference_counts():
    sacrebleu = pytest.importorskip("sacrebleu")
    rng = random.Random(0)
    vocab = "the a pub near city centre riverside cheap family friendly Eagle serves food , .".split()
    sentence = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 14)))  # noqa: E731
    refs = [[sentence() for _ in range(3)] for _ in range(40)]
    hyps = [sentence() for _ in range(40)]
    oracle = sacrebleu.corpus_bleu(hyps, [list(r) for r in zip(*refs)], tokenize="13a", lowercase=True)
    assert mteval(refs, hyps)["BLEU"] == pytest.approx(oracle.score / 100, abs=1e-9)


def test_perfect_output_scores_bleu_one_and_nist_the_sum_of_information():
    refs = [["the eagle is a pub"], ["the mill is cheap"]]
    scores = mteval(refs, ["the eagle is a pub", "the mill is cheap"])
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["NIST"] > 0


# -- bad input -----------------------------------------------------------------------------------------------------
def test_csv_without_mr_and_ref_columns_says_which_are_missing(tmp_path):
    table = tmp_path / "refs.csv"
    table.write_text("meaning,text\nname[A],A is a pub.\n")
    with pytest.raises(LrbenchError, match=r"missing column\(s\) \['mr', 'ref'\]"):
        read_references(table)


def test_empty_reference_in_a_csv_names_its_line(tmp_path):
    table = tmp_path / "refs.csv"
    table.write_text('mr,ref\n"name[A]","A is a pub."\n"name[A]",""\n')
    with pytest.raises(LrbenchError, match=r"refs.csv:3: empty reference"):
        read_references(table)


def test_two_blank_lines_in_a_row_are_an_mr_without_references(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("A is a pub.\nA, a pub.\n\n\nB is cheap.\n")
    with pytest.raises(LrbenchError, match=r"refs.txt:4: two blank lines in a row"):
        read_references(path)


def test_a_single_group_is_read_as_single_references_like_the_official_scorer(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("A is a pub.\nB is cheap.\n")
    assert read_references(path) == [["A is a pub."], ["B is cheap."]]


def test_hypothesis_count_must_match_the_reference_groups():
    with pytest.raises(LrbenchError, match="2 groups of references but 1 hypotheses"):
        score([["a"], ["b"]], ["a"], ["BLEU"])


# -- Java -----------------------------------------------------------------------------------------------------------
def test_meteor_dying_mid_evaluation_is_reported_not_scored(tmp_path, monkeypatch):
    java = fake_java(tmp_path, DIES_MID_EVALUATION)
    monkeypatch.setattr(e2e_metrics, "java_executable", lambda: java)
    out = score([["the eagle is a pub", "a pub"], ["the mill is cheap"]], ["the eagle pub", "mill cheap"])
    assert "METEOR" not in out and "simulated crash" in out["meteor_error"]
    assert {"BLEU", "NIST", "ROUGE_L", "CIDEr"} <= set(out)


def test_a_hanging_meteor_is_killed_by_the_watchdog(tmp_path):
    java = fake_java(tmp_path, "exec sleep 60")
    with pytest.raises(JavaError, match="killed after 1 s"):
        e2e_metrics.meteor({0: ["a pub"]}, {0: ["a pub"]}, java, timeout=1)


def test_without_java_the_coco_metrics_are_missing_and_the_console_script_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(e2e_metrics.importlib.util, "find_spec", lambda name: None)
    refs, hyps = tmp_path / "refs.txt", tmp_path / "hyps.txt"
    write_references(refs, [["the eagle is a pub"], ["the mill is cheap"]])
    write_hypotheses(hyps, ["the eagle pub", "mill cheap"])
    assert main([str(refs), str(hyps)]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["METEOR"] is None and printed["ROUGE_L"] is None and printed["CIDEr"] is None
    assert "no `java` on the PATH" in printed["meteor_error"] and printed["BLEU"] > 0
