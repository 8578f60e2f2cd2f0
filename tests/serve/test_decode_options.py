"""Server-wide decoding options (`lmm serve --compile`) reach both the batched and the streamed path and leave the
answers as they were."""

import json


def test_compiled_decoding_serves_the_same_answers(image_question):
    from fastapi.testclient import TestClient

    from lmm.serve.app import create_app
    from lmm.testing import CountingBackend, tiny_lmm

    model = tiny_lmm(family="llama", bridge="flamingo", gates=1.0, seed=5)
    local, wire = image_question
    want = model.chat(local, max_new_tokens=6)
    backend = CountingBackend()
    with TestClient(create_app(model, "m", decode={"compile": backend})) as client:
        body = {"model": "m", "messages": wire, "max_tokens": 6}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want
        assert backend.graphs == 1  # the batched answer decoded through the compiled step
        text = ""
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        assert text == want and backend.graphs == 1  # same batch size and bucket: the same graph
