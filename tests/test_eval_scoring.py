"""Answer parsing and scores on hand-made responses, for every task type of every benchmark."""

import math

import pytest

from streampress.eval.datasets import Question
from streampress.eval.prompts import build_prompt, first_option_letter, is_correct, parse_response
from streampress.eval.scoring import aggregate_usage, markdown_table, score_questions


def ovo(task, answer, qid=None, options=("a", "b", "c", "d"), category=None, **inputs):
    from streampress.eval.datasets import OVO_TASK_CATEGORY

    forward = task in ("REC", "SSR", "CRR")
    inputs = inputs or ({"activity": "jump"} if task == "REC" else {"step": "cut"} if task == "SSR"
                        else {"question": "what?"})
    return Question(qid=qid or f"ovo-{task}", benchmark="ovobench", task=task,
                    category=category or OVO_TASK_CATEGORY[task], video="v.mp4", time=1.0,
                    options=() if forward else tuple(options), answer=answer, inputs=inputs)


def sb(answer, qid="sb-1", task="Counting"):
    return Question(qid=qid, benchmark="streamingbench", task=task, category="realtime", video="v.mp4",
                    time=1.0, options=("w", "x", "y", "z"), answer=answer, inputs={"question": "q?"})


@pytest.mark.parametrize("task", ["EPM", "ASI", "HLD", "STU", "OJR", "ATR", "ACR", "OCR", "FPD"])
def test_ovo_multiple_choice_published_rule(task):
    q = ovo(task, "C")
    assert is_correct(q, "C")
    assert is_correct(q, "The answer is C.")
    assert is_correct(q, "C. a cat")
    assert not is_correct(q, "B")
    assert not is_correct(q, "b")  # the published rule is case-sensitive
    assert not is_correct(q, "")
    assert not is_correct(q, None)
    # published rule: the letter anywhere counts, even inside a word ("Cat")
    assert is_correct(q, "B. Cat")
    # strict: the first standalone option letter
    assert not is_correct(q, "B. Cat", strict=True)
    assert is_correct(q, "Answer: C", strict=True)
    assert parse_response(q, "B. Cat", strict=True) == "B"


def test_ovo_rec_digits_joined():
    q = ovo("REC", 3)
    assert is_correct(q, "3")
    assert is_correct(q, "They did it 3 times.")
    assert not is_correct(q, "4")
    assert not is_correct(q, "3 or 4")       # digits joined: "34"
    assert not is_correct(q, "03")           # "03" != "3", as in the published scorer
    assert not is_correct(q, "three")
    assert is_correct(ovo("REC", 0), "0")
    assert is_correct(ovo("REC", 12), "12")
    assert not is_correct(ovo("REC", 12), "1 2 3")
    # strict: first integer
    assert is_correct(q, "3 or 4", strict=True)
    assert is_correct(q, "03", strict=True)
    assert parse_response(q, "3 or 4") == "34"


@pytest.mark.parametrize("task", ["SSR", "CRR"])
def test_ovo_yes_no(task):
    yes, no = ovo(task, "Yes"), ovo(task, "No")
    assert is_correct(yes, "Yes") and not is_correct(no, "Yes")
    assert is_correct(no, "No") and not is_correct(yes, "No")
    assert is_correct(yes, "Y") and is_correct(no, "N")
    assert not is_correct(yes, "N") and not is_correct(no, "Y")
    assert not is_correct(yes, "yes")                  # case-sensitive substring
    assert is_correct(no, "None of it")                # "No" in "None": the published rule
    assert is_correct(yes, "Yes, no") is True           # contains "Yes"
    assert is_correct(no, "Yes. No.") and is_correct(yes, "Yes. No.")
    assert not is_correct(yes, "")
    # strict: first word, case-insensitive
    assert is_correct(yes, "yes", strict=True)
    assert not is_correct(no, "None of it", strict=True)
    assert not is_correct(no, "Yes. No.", strict=True)


def test_streamingbench_first_letter():
    q = sb("B")
    assert is_correct(q, "B")
    assert is_correct(q, "  B. x")
    assert is_correct(q, "Because")          # the first letter is what counts
    assert not is_correct(q, "The answer is B")
    assert not is_correct(q, "A")
    assert not is_correct(q, "")
    assert is_correct(q, "The answer is B", strict=True)
    assert not is_correct(q, "Because", strict=True)


def test_offline_letter_after_prefixes():
    q = Question(qid="m-1", benchmark="videomme", task="all", category="offline", video="v.mp4", time=None,
                 options=("p", "q", "r", "s", "t"), answer="E", inputs={"question": "q?"})
    assert is_correct(q, "E")
    assert is_correct(q, "The best answer is E.")
    assert is_correct(q, "(E) t")
    assert not is_correct(q, "A")
    assert first_option_letter("Best option: (D)", 4) == "D"
    assert first_option_letter("Everything", 4) is None
    assert first_option_letter("E", 4) is None  # not an option of a 4-way question


def test_prompts_follow_the_benchmarks():
    p = build_prompt(ovo("EPM", "A", options=("x", "y")))
    assert "Options:\nA. x; B. y;\n" in p and p.startswith("Question: what?")
    assert "How many times did they jump?" in build_prompt(ovo("REC", 1))
    assert "\ncut\n" in build_prompt(ovo("SSR", "Yes")) and "“Yes” or “No”" in build_prompt(ovo("SSR", "Yes"))
    assert "what?" in build_prompt(ovo("CRR", "No", question="what?"))
    s = build_prompt(sb("A"))
    assert s.endswith("The best option is:") and "Options:\nA. w\nB. x\nC. y\nD. z\n" in s
    off = Question(qid="m", benchmark="egoschema", task="all", category="offline", video="v.mp4", time=None,
                   options=tuple("abcde"), answer="A", inputs={"question": "q?"})
    assert "(A, B, C, D or E)" in build_prompt(off) and "E. e" in build_prompt(off)


def test_ovo_scores_category_means_and_overall():
    qs, resp = [], {}

    def add(task, answer, response, n):
        q = ovo(task, answer, qid=f"{task}-{n}")
        qs.append(q)
        resp[q.qid] = response

    # backward: EPM 1/2, ASI 1/1, HLD 0/1 -> mean (0.5 + 1 + 0) / 3 = 0.5
    add("EPM", "A", "A", 0)
    add("EPM", "A", "B", 1)
    add("ASI", "B", "B", 0)
    add("HLD", "C", "D", 0)
    # realtime: STU 1/1, OCR 0/2 -> (1 + 0) / 2 = 0.5; other real-time tasks absent
    add("STU", "D", "D", 0)
    add("OCR", "A", "B", 0)
    add("OCR", "A", "C", 1)
    # forward: REC 1/2, SSR 2/2, CRR 1/4 -> (0.5 + 1 + 0.25) / 3
    add("REC", 2, "2", 0)
    add("REC", 2, "5", 1)
    add("SSR", "Yes", "Yes", 0)
    add("SSR", "No", "No", 1)
    add("CRR", "Yes", "Yes", 0)
    add("CRR", "Yes", "No", 1)
    add("CRR", "No", "Yes", 2)
    add("CRR", "No", "x", 3)
    # an unanswered question is not scored
    qs.append(ovo("ATR", "A", qid="ATR-unanswered"))
    s = score_questions(qs, resp)
    assert s["tasks"]["EPM"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert s["tasks"]["CRR"]["accuracy"] == 0.25 and "ATR" not in s["tasks"]
    assert s["categories"]["backward"]["accuracy"] == pytest.approx(0.5)
    assert s["categories"]["realtime"]["accuracy"] == pytest.approx(0.5)
    fwd = (0.5 + 1 + 0.25) / 3
    assert s["categories"]["forward"]["accuracy"] == pytest.approx(fwd)
    assert s["overall"] == pytest.approx((0.5 + 0.5 + fwd) / 3)
    assert s["task_mean"] == pytest.approx((0.5 + 1 + 0 + 1 + 0 + 0.5 + 1 + 0.25) / 8)
    assert s["answered"] == 15 and s["expected"] == 16


def test_streamingbench_scores_micro_overall():
    qs = [sb("A", "q0", "Counting"), sb("B", "q1", "Counting"), sb("C", "q2", "Counting"), sb("D", "q3", "OCR")]
    resp = {"q0": "A", "q1": "A", "q2": "A", "q3": "D"}
    s = score_questions(qs, resp)
    assert s["tasks"]["Counting"]["accuracy"] == pytest.approx(1 / 3)
    assert s["tasks"]["OCR"]["accuracy"] == 1.0
    assert s["overall"] == pytest.approx(2 / 4)  # over questions, not the mean of tasks (2/3)
    md = markdown_table({"scores": s, "config": {"model": "m"}, "usage": {}})
    assert "| Counting | 1 | 3 | 33.33 |" in md and "**50.00**" in md


def test_usage_counts_each_session_once():
    recs = [
        {"qid": "a", "session": "v1", "elapsed_s": 1.0, "ask_s": 0.1,
         "stats": {"visual_tokens_seen": 40, "visual_tokens_kept": 10}},
        {"qid": "b", "session": "v1", "elapsed_s": 2.0, "ask_s": 0.2,
         "stats": {"visual_tokens_seen": 100, "visual_tokens_kept": 30}},
        {"qid": "c", "session": "v2", "elapsed_s": 0.5, "ask_s": 0.1,
         "stats": {"visual_tokens_seen": 20, "visual_tokens_kept": 20}},
    ]
    u = aggregate_usage(recs)
    assert u["visual_tokens_seen"] == 120 and u["visual_tokens_kept"] == 50
    assert u["keep_fraction"] == pytest.approx(50 / 120)
    assert math.isclose(u["time_s"], 3.5) and u["sessions"] == 2
