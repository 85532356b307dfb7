"""Issue 16 on LMDeploy's real ``api_server`` (CPU shim, tiny Llama, greedy): a second tenant
sending the first tenant's exact prompt with another ``cache_salt`` gets zero cached tokens and
the same output; the first tenant's own salt, and unsalted requests among themselves, hit."""
import pytest

from lmdeploy_hostcache.testing.models import write_tiny_model
from lmdeploy_hostcache.testing.server import api_server

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")

ARGS = ["--cache-block-seq-len", "16", "--session-len", "1024", "--max-batch-size", "2",
        "--num-gpu-blocks", "256"]
PROMPT = "a shared system prompt that one tenant sent first, long enough for several blocks of sixteen"


def test_cache_salt_isolates_tenants_on_the_live_server(tmp_path):
    model = str(write_tiny_model(tmp_path / "tinylm", "llama", seed=1))
    with api_server(model, host_cache_gb=1, extra_args=ARGS) as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")

        def ask(salt):
            extra = {"top_k": 1, "ignore_eos": True, "return_token_ids": True}
            if salt is not None:
                extra["cache_salt"] = salt
            r = client.chat.completions.create(model=client.models.list().data[0].id,
                                               messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
                                               temperature=0, extra_body=extra)
            details = r.usage.prompt_tokens_details
            return (details.cached_tokens if details else 0), (r.choices[0].model_extra or {}).get("output_ids")

        a1, out_a1 = ask("tenant-a")
        b1, out_b1 = ask("tenant-b")
        a2, out_a2 = ask("tenant-a")
        n1, _ = ask(None)
        n2, out_n2 = ask(None)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=client.models.list().data[0].id,
                                           messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                           extra_body={"cache_salt": 7})
        assert "cache_salt" in err.value.response.text, err.value.response.text
    assert a1 == 0 and b1 == 0, (a1, b1)             # the other tenant's prefix is not reused
    assert a2 >= 64 and n1 == 0 and n2 >= 64, (a2, n1, n2)
    assert out_a1 == out_b1 == out_a2 == out_n2 and out_a1
