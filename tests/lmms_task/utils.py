"""Functions of the local lmms-eval tasks of tests/test_lmms_eval.py (lmms-eval imports this file
from the task folder the test writes: ``!function utils.<name>`` in the YAMLs).

The data is a VideoMME directory in its published layout (``videomme.json``, ``data/<videoID>.mp4``)
under ``$VIDEOFLASH_LMMS_DATA``. The prompt is VideoChat-Flash's VideoMME prompt, written out here
from the published strings (not taken from videoflash), so that equal replies from lmms-eval and
from videoflash's offline runner mean both asked the same thing about the same frames.
"""

import os

HEAD = ("Select the best answer to the following multiple-choice question based on the video. "
        "Respond with only the letter (A, B, C, or D) of the correct option.")


def doc_to_visual(doc):
    return [os.path.join(os.environ["VIDEOFLASH_LMMS_DATA"], "data", doc["videoID"] + ".mp4")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    options = "\n".join(doc["options"])
    return kw.get("pre_prompt", "") + HEAD + "\n" + doc["question"] + "\n" + options + "\n" + kw.get("post_prompt", "")


def process_results(doc, results):
    """Scored by videoflash's VideoMME rule (the runner's), so both scores must agree."""
    from videoflash.eval.benchmarks import extract_letter_videomme

    pred = extract_letter_videomme(results[0])
    return {"accuracy": float(pred == doc["answer"])}


def doc_to_choice(doc):
    return ["A", "B", "C", "D"]


def doc_to_target(doc):
    return "ABCD".index(doc["answer"])


FOLLOW_UP = "Are you sure? Answer with the option's letter only."


def multi_round_doc_to_text(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None,
                            previous_round_info=None):
    """Round 0: the question; round 1: a follow-up; then stop (lmms-eval's multi-round protocol:
    ``(visuals, context, stop, replies so far, info)`` from round 1 on)."""
    if round_idx is None:
        return doc_to_text(doc, lmms_eval_specific_kwargs)
    if round_idx >= 2:
        return None, None, True, previous_output, previous_round_info
    return None, FOLLOW_UP, False, previous_output, previous_round_info


def multi_round_process_results(doc, results):
    from videoflash.eval.benchmarks import extract_letter_videomme

    replies = results[0]
    return {"final_accuracy": float(extract_letter_videomme(replies[-1]) == doc["answer"]),
            "rounds": float(len(replies))}
