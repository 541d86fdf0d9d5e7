"""RULER-style generators on the shipped tiny tokenizer: exact lengths, seeded, the answers where the task says, the
scorer, the three haystacks, templates."""

import collections
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from specache_compile.evals import ruler
from specache_compile.evals.tasks import CorpusFiller

TINY = Path(__file__).resolve().parents[2] / "models" / "specache-tiny"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def essay(tok):
    """Real-text filler without building the corpus: lines of this package's own sources."""
    text = "".join(p.read_text() for p in sorted((TINY.parents[1] / "specache_compile" / "evals").glob("*.py")))
    nl = tok("\n", add_special_tokens=False).input_ids[0]
    return CorpusFiller(tok(text, add_special_tokens=False).input_ids, nl, tok.decode)


def _make(name, tok, essay, length, depth, seed, **kw):
    if name in ("niah_single_essay", "niah_multikey", "niah_multivalue", "niah_multiquery"):
        kw["filler"] = essay
    return ruler.RULER[name](tok, length, depth, seed, **kw)


@pytest.mark.parametrize("name", list(ruler.RULER))
def test_exact_length_seeded_and_answers_in_the_prompt(tok, essay, name):
    for length in (700, 1024, 2048):
        task = _make(name, tok, essay, length, 0.4, 7)
        assert len(task.input_ids) == task.length == length
        assert task.answers and task.max_new_tokens > 0
        assert all(a in task.prompt for a in task.answers)
        assert task.input_ids == _make(name, tok, essay, length, 0.4, 7).input_ids  # same seed, same task
    assert _make(name, tok, essay, 1024, 0.4, 8).answers != task.answers  # another seed, another task


def test_score_is_the_share_of_answers_found(tok):
    task = ruler.niah_multivalue(tok, 1024, 0.5, 1, haystack="repeat")
    a = task.answers
    assert len(a) == 4
    assert task.score(" " + ", ".join(a) + ".") == 1.0
    assert task.score(f" {a[0]} and {a[2]}") == 0.5
    assert task.score("I do not know.") == 0.0
    words = ruler.common_words(tok, 1024, seed=1)
    assert words.score(" " + ", ".join(w.upper() for w in words.answers)) == 1.0  # case-insensitive


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_the_needle_sits_at_depth(tok, depth):
    task = ruler.niah_single(tok, 2048, depth, 3, haystack="repeat")
    (value,) = task.answers
    text = task.prompt
    start, stop = text.index("afterwards.\n") + len("afterwards.\n"), text.index("\nWhat are all")
    at = text.index("One of the special magic numbers for ")
    assert abs((at - start) / (stop - start) - depth) < 0.05  # at the line start nearest the depth
    assert text.count(value) == 1 and text[at:].startswith("One of the special magic numbers for ")


def test_the_needles_haystack_is_distractors_with_other_keys(tok):
    task = ruler.niah_single(tok, 2048, 0.5, 3, haystack="needles")
    key = re.search(r"special magic numbers for (\S+) mentioned", task.prompt).group(1)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", task.prompt)
    assert len(needles) > 50  # the haystack itself is needles
    assert [v for k, v in needles if k == key] == list(task.answers)  # the asked key once, with the answer
    assert len({k for k, _ in needles}) == len(needles)


def test_multikey_and_multiquery_ask_for_what_they_say(tok, essay):
    mk = ruler.niah_multikey(tok, 1500, 0.3, 2, filler=essay)
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)", mk.prompt)
    assert len(needles) == 4 and len(mk.answers) == 1 and mk.answers[0] in {v for _, v in needles}
    mq = ruler.niah_multiquery(tok, 1500, 0.3, 2, filler=essay)
    assert sorted(mq.answers) == sorted(v for _, v in re.findall(r"numbers for (\S+) is: (\d+)", mq.prompt))


def test_variable_tracking_chain_in_order(tok):
    task = ruler.variable_tracking(tok, 1500, 0.2, 4, n_chains=2, n_hops=3)
    assign = dict(re.findall(r"VAR (\w+) = (VAR \w+|\d+)\.", task.prompt))
    assert len(assign) == 8 and len(task.answers) == 4
    value = assign[task.answers[0]]
    assert value.isdigit() and f"the value {value}" in task.prompt
    for prev, var in zip(task.answers, task.answers[1:]):
        assert assign[var] == f"VAR {prev}"
        assert task.prompt.index(f"VAR {prev} =") < task.prompt.index(f"VAR {var} =")
    # the first assignment near depth 0.2 of the haystack
    assert 0.1 < task.prompt.index(f"VAR {task.answers[0]} =") / len(task.prompt) < 0.35


def test_common_and_frequent_words_answers_are_the_most_frequent(tok):
    for length in (1024, 4096):
        cwe = ruler.common_words(tok, length, seed=5)
        counts = collections.Counter(re.findall(r"^\d+\. (\w+)$", cwe.prompt, flags=re.M))
        top = [w for w, _ in counts.most_common(len(cwe.answers))]
        assert sorted(top) == sorted(cwe.answers) and len(cwe.answers) == 10
        assert min(counts[w] for w in cwe.answers) > max(c for w, c in counts.items() if w not in cwe.answers)
        fwe = ruler.frequent_words(tok, length, seed=5)
        body = fwe.prompt.split("coded words.\n", 1)[1].split("\nQuestion:")[0]
        counts = collections.Counter(w for w in body.split() if w != "....")
        ranked = counts.most_common(4)
        assert [w for w, _ in ranked[:3]] == list(fwe.answers)
        assert ranked[2][1] > ranked[3][1]  # no tie at the cut


def test_template_wraps_the_prompt_and_the_answer_prefix_follows(tok):
    tpl = ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    task = ruler.niah_single(tok, 1024, 0.5, 1, template=tpl)
    assert len(task.input_ids) == 1024
    assert task.prompt.startswith(tpl[0] + "Some special magic numbers")
    assert task.prompt.endswith(tpl[1] + "The special magic numbers for " + task.prompt.split("numbers for ")[-1])
    bare = ruler.niah_single(tok, 1024, 0.5, 1)
    assert "text?\nThe special magic numbers" in bare.prompt  # no template: the prefix on a line of its own
    assert ruler.prompt_template(tok) == ("", "\n")  # the tiny tokenizer: no chat template, adds no BOS


def test_prompt_round_trips_through_the_tokenizer(tok):
    # the tiny tokenizer isolates "\n": the prompt's ids are its encoding (line-wise concatenation changes nothing)
    for name in ("niah_single_repeat", "variable_tracking", "common_words", "frequent_words"):
        task = ruler.RULER[name](tok, 1024, 0.5, 2)
        assert tok(task.prompt, add_special_tokens=False).input_ids == task.input_ids, name


def test_errors_say_what_to_ask_for(tok):
    with pytest.raises(ValueError, match="too short .* ask for at least"):
        ruler.niah_multivalue(tok, 60, 0.5, 1, haystack="repeat")
    with pytest.raises(ValueError, match="depth must be in"):
        ruler.niah_single(tok, 1024, 1.5, 1)
    with pytest.raises(ValueError, match="haystack must be one of"):
        ruler.niah_single(tok, 1024, 0.5, 1, haystack="lorem")
    with pytest.raises(ValueError, match="ask for a longer length"):
        ruler.common_words(tok, 200, seed=1)
    short = ruler.common_words(tok, 640, seed=1)  # a short list: the common words fewer times, the others once
    counts = collections.Counter(re.findall(r"^\d+\. (\w+)$", short.prompt, flags=re.M))
    assert min(counts[w] for w in short.answers) > max(c for w, c in counts.items() if w not in short.answers)
