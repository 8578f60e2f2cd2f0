"""The official VQA accuracy: answer normalisation and the 10-annotator leave-one-out average.

Follows `PythonEvaluationTools/vqaEvaluation/vqaEval.py` of GT-Vision-Lab/VQA (the scorer behind
the VQAv2 leaderboard, also used for OK-VQA, TextVQA and VizWiz) rule for rule, quirks included:

- the prediction: newlines/tabs -> spaces, strip, `process_punctuation`, then `process_digit_article`
  (lower-case, number words -> digits, drop articles, restore contractions);
- the human answers: `process_punctuation` only, and only when the 10 answers are not all identical
  (the official code relies on the annotation files' answers being normalised already);
- the score: for each of the 10 annotators in turn, leave that annotator out and count how many of
  the other 9 gave the prediction; `min(1, count / 3)`; the question's accuracy is the mean of the
  10 values. (The official code removes the left-out annotator by dict equality, which is "by
  position" whenever answers carry distinct `answer_id`s, as VQAv2/OK-VQA do; here it is by position
  always, so plain-string answers such as TextVQA's behave the same way.)
"""

from __future__ import annotations

import re
from collections.abc import Sequence

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
MANUAL_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
# Both regexes verbatim from the official code. `(?!<=\d)` is a (mis-typed) negative *lookahead*,
# so in effect a period is removed unless a digit follows it: "2.5" keeps it, "dog." loses it.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The official code calls `periodStrip.sub("", text, re.UNICODE)`, whose third positional argument is
# `count`: at most re.UNICODE (= 32) periods are removed. Kept for exactness.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a punctuation mark next to a space (or any text holding a
    digit-comma-digit) is deleted, otherwise replaced by a space; then periods not before a digit go."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words -> digits, drop articles, contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
    """The full normalisation the official scorer applies to a predicted answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official accuracy of one prediction against the human answers (10 for VQAv2), in [0, 1]."""
    if not human_answers:
        raise ValueError(
            "vqa_accuracy needs at least one human answer; the annotation file has a question "
            "with an empty 'answers' list"
        )
    pred = normalize_answer(prediction)
    gts = list(human_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    total = 0.0
    for left_out in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != left_out and a == pred)
        total += min(1.0, matches / 3)
    return total / len(gts)
