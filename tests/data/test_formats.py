"""Record layouts -> Sample (lmm.data.formats)."""

import json

import pytest

from lmm.data.errors import BadSample
from lmm.data.formats import MediaRef, parse_record


def kinds(sample):
    return ["I" if isinstance(p, MediaRef) else p for p in sample.parts]


def test_mmc4_places_images_before_matched_sentence_and_drops_low_similarity():
    rec = {
        "text_list": ["first.", "second.", "third."],
        "image_info": [
            {"image_name": "a.jpg", "matched_text_index": 1, "matched_sim": 0.3},
            {"image_name": "b.jpg", "matched_text_index": 2, "matched_sim": 0.1},
            {"image_name": "c.jpg", "matched_text_index": 0, "matched_sim": 0.5},
        ],
    }
    s = parse_record(rec, "auto", "k", min_similarity=0.24)
    assert kinds(s) == ["I", "first.", "I", "second.", "third."]
    assert [r.value["image_name"] for r in s.media_refs] == ["c.jpg", "a.jpg"]


def test_mmc4_without_any_matching_image_is_no_images():
    rec = {"text_list": ["t"], "image_info": [{"image_name": "a.jpg", "matched_text_index": 0, "matched_sim": 0.01}]}
    with pytest.raises(BadSample) as e:
        parse_record(rec, "mmc4", "k", min_similarity=0.24)
    assert e.value.reason == "no_images"


def test_obelics_keeps_order_and_checks_lengths():
    s = parse_record({"texts": ["intro", None, "after"], "images": [None, b"x", None]}, "auto", "k")
    assert kinds(s) == ["intro", "I", "after"]
    with pytest.raises(BadSample) as e:
        parse_record({"texts": ["a"], "images": [None, b"x"]}, "obelics", "k")
    assert e.value.reason == "bad_record"


def test_webdataset_pair_with_json_caption_and_empty_text():
    s = parse_record({"png": b"img", "json": json.dumps({"caption": "a cat"}).encode()}, "auto", "k")
    assert kinds(s) == ["I", "a cat"] and s.parts[0].value == b"img"
    with pytest.raises(BadSample) as e:
        parse_record({"jpg": b"img", "txt": b"   "}, "auto", "k")
    assert e.value.reason == "empty_text"
    with pytest.raises(BadSample) as e:
        parse_record({"txt": b"caption only"}, "pair", "k")
    assert e.value.reason == "missing_image"


def test_bad_json_is_bad_record():
    with pytest.raises(BadSample) as e:
        parse_record({"jpg": b"x", "json": b"{not json"}, "auto", "k")
    assert e.value.reason == "bad_record"


def test_video_record_detected():
    s = parse_record({"mp4": b"vid", "txt": b"a clip"}, "auto", "k")
    assert s.parts[0].kind == "video" and s.parts[1] == "a clip"


def test_llava_from_value_keeps_marker_position_and_maps_roles():
    rec = {
        "image": "x.jpg",
        "conversations": [{"from": "human", "value": "Look: <image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}],
    }
    s = parse_record(rec, "auto", "k")
    assert s.kind == "conversation"
    assert s.messages == [
        {"role": "user", "content": "Look: <image>\nWhat is it?"},
        {"role": "assistant", "content": "A cat."},
    ]
    assert [m.value for m in s.media] == ["x.jpg"]


def test_llava_missing_markers_are_prepended_to_first_user_turn():
    rec = {
        "images": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Compare."},
            {"from": "gpt", "value": "Same."},
        ],
    }
    s = parse_record(rec, "conversation", "k")
    assert s.messages[1]["content"] == "<image><image>\nCompare."
    assert len(s.media) == 2


def test_openai_parts_become_markers_in_place():
    rec = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Before "},
                    {"type": "image_url", "image_url": {"url": "p.png"}},
                    {"type": "text", "text": " after"},
                ],
            },
            {"role": "assistant", "content": "ok"},
        ]
    }
    s = parse_record(rec, "auto", "k")
    assert s.messages[0]["content"] == "Before <image> after"
    assert [m.value for m in s.media] == ["p.png"]


@pytest.mark.parametrize(
    "rec,reason",
    [
        (
            {
                "image": "a.jpg",
                "conversations": [{"from": "human", "value": "<image><image>hi"}, {"from": "gpt", "value": "yo"}],
            },
            "image_count_mismatch",
        ),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": " "}]}, "empty_text"),
        ({"conversations": [{"from": "alien", "value": "hi"}]}, "bad_record"),
    ],
)
def test_conversation_problems_are_bad_samples(rec, reason):
    with pytest.raises(BadSample) as e:
        parse_record(rec, "auto", "k")
    assert e.value.reason == reason
