"""Prompt templates and answer parsing, per benchmark, as the benchmarks' own code defines them.

The templates are the published drivers' text (OVO-Bench's ``build_prompt``, StreamingBench's
``PROMPT_TEMPLATE``), with the source-code indentation of OVO-Bench's triple-quoted strings
removed. The chat template around them is the model adapter's.

OVO-Bench (its published scorer):
- backward / real-time multiple choice: options written ``A. x; B. y;``; correct when the
  letter ``chr(65 + gt)`` appears anywhere in the response;
- REC: correct when all digits of the response, joined, equal the count;
- SSR / CRR: correct when the response is exactly ``"Y"``/``"N"`` or contains ``"Yes"``/``"No"``
  for type 1/0.
StreamingBench: the prompt ends with ``"The best option is:"``; correct when the first letter
of the response equals the answer.
Offline sets (VideoMME style): the first option letter found after common answer prefixes.

``strict=True`` selects a stricter parse for every benchmark: the first standalone option
letter (multiple choice), the first integer (REC), the first word (yes/no). The published
rules are the default, so scores compare with the papers.
"""

from __future__ import annotations

import re

from .datasets import Question

_OVO_MCQ = ("Question: {question}\nOptions:\n{options}\n"
            "Respond only with the letter corresponding to your chosen option (e.g., A, B, C).\n"
            "Do not include any additional text or explanation in your response.")
_OVO_REC = ("You're watching a video in which people may perform a certain type of action repetively.\n"
            "The person performing this kind of action are referred to as 'they' in the following statement.\n"
            "You're task is to count how many times have different people in the video perform this kind of "
            "action in total.\nOne complete motion counts as one.\n"
            "Now, answer the following question: How many times did they {activity}?\n"
            "Provide your answer as a single number (e.g., 0, 1, 2, 3…) indicating the total count.\n"
            "Do not include any additional text or explanation in your response.")
_OVO_SSR = ("You're watching a tutorial video which contain a sequential of steps.\n"
            "The following is one step from the whole procedures:\n{step}\n"
            "Your task is to determine if the man or woman in the video is currently performing this step.\n"
            "Answer only with “Yes” or “No”.\n"
            "Do not include any additional text or explanation in your response.")
_OVO_CRR = ("You're responsible of answering questions based on the video content.\n"
            "The following question are relevant to the latest frames, i.e. the end of the video.\n"
            "{question}\n"
            "Decide whether existing visual content, especially latest frames, i.e. frames that near the "
            "end of the video, provide enough information for answering the question.\n"
            "Answer only with “Yes” or “No”.\n"
            "Do not include any additional text or explanation in your response.")
_STREAMINGBENCH = ("You are an advanced video question-answering AI assistant. You have been provided with "
                   "some frames from the video and a multiple-choice question related to the video. Your task "
                   "is to carefully analyze the video and provide the best answer to question, choosing from "
                   "the four options provided. Respond with only the letter (A, B, C, or D) of the correct "
                   "option.\n\nQuestion: {question}\n\nOptions:\n{options}\n\nThe best option is:")
_OFFLINE = ("Select the best answer to the following multiple-choice question based on the video. "
            "Respond with only the letter ({letters}) of the correct option.\n{question}\n{options}\n"
            "The best answer is:")
_ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option is", "The correct option is", "Best answer:", "Best option:")


def _letters(n: int) -> list[str]:
    return [chr(65 + i) for i in range(n)]


def build_prompt(q: Question) -> str:
    """The text asked to the model for ``q`` (the video comes from the session)."""
    if q.benchmark == "ovobench":
        if q.task == "REC":
            return _OVO_REC.format(activity=q.inputs["activity"])
        if q.task == "SSR":
            return _OVO_SSR.format(step=q.inputs["step"])
        if q.task == "CRR":
            return _OVO_CRR.format(question=q.inputs["question"])
        opts = "; ".join(f"{l}. {o}" for l, o in zip(_letters(len(q.options)), q.options)) + ";"
        return _OVO_MCQ.format(question=q.inputs["question"], options=opts)
    if q.benchmark == "streamingbench":
        opts = "\n".join(f"{l}. {o}" for l, o in zip(_letters(len(q.options)), q.options))
        return _STREAMINGBENCH.format(question=q.inputs["question"], options=opts)
    letters = _letters(len(q.options))
    opts = "\n".join(f"{l}. {o}" for l, o in zip(letters, q.options))
    letter_list = ", ".join(letters[:-1]) + f" or {letters[-1]}" if len(letters) > 1 else letters[0]
    return _OFFLINE.format(letters=letter_list, question=q.inputs["question"], options=opts)


def first_option_letter(response: str, n_options: int) -> str | None:
    """The first standalone option letter of ``response`` after common answer prefixes, or None."""
    s = response.strip()
    for prefix in _ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    valid = "".join(_letters(max(n_options, 1)))
    m = re.search(rf"(?<![A-Za-z])([{valid}])(?![A-Za-z])", s)
    return m.group(1) if m else None


def parse_response(q: Question, response: str | None, strict: bool = False):
    """What the response answers, in the ground truth's terms (None when nothing is found).

    Lenient (published) parses return what the rule looks at: for OVO multiple choice the
    ground-truth letter when it appears, else the first option letter; for REC the joined
    digits as a string (``"007"`` does not equal 7, as in the published scorer); for SSR/CRR
    "Yes"/"No" as the published substring test finds them.
    """
    if response is None:
        return None
    if q.benchmark == "ovobench" and q.task == "REC":
        if strict:
            m = re.search(r"\d+", response)
            return str(int(m.group(0))) if m else None
        digits = "".join(re.findall(r"\d+", response))
        return digits or None
    if q.benchmark == "ovobench" and q.task in ("SSR", "CRR"):
        if strict:
            m = re.match(r"\W*(yes|no|y|n)\b", response.strip(), flags=re.IGNORECASE)
            return None if m is None else ("Yes" if m.group(1).lower().startswith("y") else "No")
        if response == "Y":
            return "Yes"
        if response == "N":
            return "No"
        has_yes, has_no = "Yes" in response, "No" in response
        if has_yes and has_no:  # the published rule counts either as matching
            return "Yes/No"
        return "Yes" if has_yes else "No" if has_no else None
    if q.benchmark == "ovobench":
        if not strict and isinstance(q.answer, str) and q.answer in response:
            return q.answer
        return first_option_letter(response, len(q.options))
    if q.benchmark == "streamingbench" and not strict:
        s = response.strip()
        return s[0] if s else None
    return first_option_letter(response, len(q.options))


def is_correct(q: Question, response: str | None, strict: bool = False) -> bool:
    """Whether ``response`` answers ``q`` correctly under the benchmark's rule."""
    if response is None or q.answer is None:
        return False
    parsed = parse_response(q, response, strict)
    if q.benchmark == "ovobench" and q.task in ("SSR", "CRR") and parsed == "Yes/No":
        return True
    if q.benchmark == "ovobench" and q.task == "REC":
        return parsed == str(q.answer)
    return parsed is not None and parsed == q.answer
