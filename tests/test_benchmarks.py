"""Answer extraction against worked examples of lmms-eval's rules, and prompt building per format."""

import random

import pytest

from videoflash.eval import benchmarks as B


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"),
    ("The best answer is C.", "C"),
    ("(D) a red ball", "D"),
    ("The answer is: a", ""),          # lower-case letters do not count
    ("Because", "B"),                  # the first capital option letter, also inside a word
    ("I think it is the dog", ""),
    ("E", ""),                         # only A-D
])
def test_videomme_rule(reply, letter):
    assert B.extract_letter_videomme(reply) == letter


def test_videomme_joined_prefixes_quirk():
    # lmms-eval's prefix list joins "Best answer:" with "Best option:" (a missing comma), so
    # "Best answer:" stays in the reply and its capital B is the first letter found.
    assert B.extract_letter_videomme("The best option is B") == "B"
    assert B.extract_letter_videomme("Best answer: C") == "B"  # "Best answer:" is not removed: B of "Best"


@pytest.mark.parametrize("reply,letter", [
    ("A. a cat", "A"),
    ("(b)", "B"),
    ("The answer is C", "C"),
    ("d", "D"),
    ("a dog", "A"),   # stand-alone "a" counts, case-insensitive
    ("dog", "dog"),
])
def test_mvbench_rule(reply, letter):
    assert B._mvbench_normalise(reply) == letter


def test_longvideobench_rule_and_fallback():
    rng = random.Random(0)
    assert B.extract_letter_longvideobench("Best option: E", list("ABCDE"), rng) == "E"
    picks = {B.extract_letter_longvideobench("no idea", list("ABC"), random.Random(s)) for s in range(50)}
    assert picks == set("ABC")


def test_perceptiontest_rule():
    assert B.extract_letter_perceptiontest("A") == "A"
    assert B.extract_letter_perceptiontest("A.") == ""
    assert B.extract_letter_perceptiontest(" B") == ""


def test_prompts():
    assert B.MVBench().prompt({"question": "What?", "candidates": ["x", "y"]}) == (
        "Question:What?\nOption:\n(A) x\n(B) y\nAnswer with the option's letter from the given choices directly.")
    assert B.PerceptionTest().prompt({"question": "Q", "options": ["a", "b", "c"]}) == (
        "Q\nA. a\nB. b\nC. c\nAnswer with the option's letter from the given choices directly.")
    lvb = {"question": "Q", "option0": "a", "option1": "b", "option2": "N/A", "option3": "N/A", "option4": "N/A"}
    assert B.LongVideoBench().prompt(lvb) == "Q\nA. a\nB. b\nAnswer with the option's letter from the given choices directly.\n"
    assert B.MLVU().prompt({"question": "Q\n(A) x"}) == "\nQ\n(A) x\nOnly give the best option.\n\nBest option: ("
