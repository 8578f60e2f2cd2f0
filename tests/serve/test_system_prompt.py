"""The app renders conversations exactly as `model.chat` does, including the model's default system prompt,
on both the batched and the streamed path (the app in process, over real HTTP semantics via TestClient)."""


def test_default_system_prompt_reaches_batched_and_streamed_answers(image_question):
    from fastapi.testclient import TestClient

    from lmm.serve.app import create_app
    from lmm.testing import stream_chat, tiny_lmm

    model = tiny_lmm(family="llama", bridge="flamingo", gates=0.3, seed=5)
    local, wire = image_question
    without = model.chat(local, max_new_tokens=6)
    model.config.system_prompt = "You are a terse assistant that names shapes."
    want = model.chat(local, max_new_tokens=6)
    assert want != without and "\ufffd" not in want, "this input's answer should depend on the system prompt"

    with TestClient(create_app(model, "m")) as client:
        body = {"model": "m", "messages": wire, "max_tokens": 6}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
        status, text = stream_chat(client, "", body)
        assert status == 200
        assert text == want
