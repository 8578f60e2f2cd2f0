"""Server-wide decoding options (`lmm serve --compile`) reach both the batched and the streamed path and leave the
answers as they were."""


def test_compiled_decoding_serves_the_same_answers(image_question):
    from fastapi.testclient import TestClient

    from lmm.serve.app import create_app
    from lmm.testing import CountingBackend, stream_chat, tiny_lmm

    model = tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=5)
    local, wire = image_question
    want = model.chat(local, max_new_tokens=6)
    backend = CountingBackend()
    with TestClient(create_app(model, "m", decode={"compile": backend})) as client:
        body = {"model": "m", "messages": wire, "max_tokens": 6}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
        assert backend.graphs == 1  # the batched answer decoded through the compiled step
        status, text = stream_chat(client, "", body)
        assert status == 200
        assert text == want and backend.graphs == 1  # same batch size and bucket: the same graph
