"""The official `openai` npm package against the server, as a Node program would use it: streaming
with `for await`, stop strings, log-probs, an aborted stream, /v1/completions with echo, and a
wrong API key. Skips with the reason when Node or the npm registry is not available."""

import json
import shutil
import subprocess

import httpx
import pytest

from picochat.serve.commands import build_app
from tests.serve.conftest import ServerThread, serve_args
from tests.serve.test_api import wait_for

OPENAI_NPM = "openai@6.30.1"  # the newest line that still runs on Node 20 (7.x needs Node 22)
pytestmark = pytest.mark.slow

SCRIPT = r"""
import OpenAI from "openai";
const [baseURL, key] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: key, maxRetries: 0 });
const out = {};
const messages = [{ role: "user", content: "Tell me about the fox" }];
const ask = { model: "picochat", messages, max_tokens: 20, temperature: 1.0, seed: 11 };

const full = await client.chat.completions.create(ask);
out.full = full.choices[0].message.content;
const stop = [...out.full.slice(2)].map((_, i) => out.full.slice(2 + i, 4 + i))
  .find((s) => s.length === 2 && /^[ -;?-~]+$/.test(s));   // printable ASCII without < = >
out.stop = stop;
let streamed = "", reasons = [], logprobs = 0;
const stream = await client.chat.completions.create({ ...ask, stream: true, stop: [stop], logprobs: true });
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    streamed += choice.delta.content ?? "";
    if (choice.finish_reason) reasons.push(choice.finish_reason);
    logprobs += choice.logprobs?.content?.length ?? 0;
  }
}
Object.assign(out, { streamed, reasons, logprobs });

const long = await client.chat.completions.create({ ...ask, max_tokens: 200, stream: true });
let chunks = 0;
for await (const chunk of long) { if (++chunks === 3) { long.controller.abort(); break; } }
out.abortedAfter = chunks;

const completion = await client.completions.create({ model: "picochat", prompt: "Hello there", max_tokens: 3,
  echo: true, logprobs: 2, temperature: 0 });
out.completion = { text: completion.choices[0].text, tokens: completion.choices[0].logprobs.tokens.length };

try {
  await new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 }).chat.completions.create(ask);
  out.badKey = "accepted";
} catch (e) { out.badKey = { status: e.status, code: e.code }; }
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def node_project(tmp_path_factory):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    project = tmp_path_factory.mktemp("node_openai")
    (project / "package.json").write_text('{"private": true, "type": "module"}')
    try:
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", OPENAI_NPM], cwd=project,
                       check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not npm install {OPENAI_NPM} (no registry?): {getattr(e, 'stderr', '') or e}"[:300])
    (project / "client.mjs").write_text(SCRIPT)
    return project


def test_the_openai_npm_client(node_project, checkpoint_home):
    app, _ = build_app(serve_args("--device", "cpu", "--dtype", "fp32", "--api-key", "node-key", "--max-tokens", "24"))
    with ServerThread(app) as srv:
        run = subprocess.run(["node", "client.mjs", f"{srv.url}/v1", "node-key"], cwd=node_project,
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        out = json.loads(run.stdout)
        wait_for(lambda: httpx.get(f"{srv.url}/health").json()["busy"] == 0)  # the aborted stream freed its worker
        assert app.state.cancelled == 1
    assert out["streamed"] == out["full"][:out["full"].index(out["stop"])]
    assert out["reasons"] == ["stop"] and out["logprobs"] >= 1
    assert out["abortedAfter"] == 3
    assert out["completion"]["text"].startswith("Hello there") and out["completion"]["tokens"] > 3
    assert out["badKey"] == {"status": 401, "code": "invalid_api_key"}
