"""Agents the loop calls once per iteration: a command (any coding-agent CLI) or an OpenAI-compatible
chat endpoint driven through tool calls. Each gets the prompt, edits the research files of its
worktree, and answers one line describing its change.

    --agent "claude -p"                   prompt on stdin (or in a file: put {prompt_file} in CMD)
    --agent openai:http://127.0.0.1:8000/v1   POST /chat/completions with tools (stdlib urllib)

The endpoint's key is read from an environment variable (--key-env, default OPENAI_API_KEY), sent
only in the Authorization header (never on to a redirect: none is followed), and redacted from any
error text; transcripts never contain it.

A command agent runs in bubblewrap where it is usable (sandbox.py): it keeps its network (it talks to
its model's API) and writes only its worktree (and the paths given with --agent-rw, e.g. the CLI's
own state directory); the session's directory (ledger, key, runs, logs) and the prepared data are
hidden from it, and the main checkout is read-only. Where bubblewrap is not usable it runs as the
user, and `init` and `report` say "agent unsandboxed". The OpenAI agent's hands are the harness's own
Tools below (read the worktree, write the research files), so it needs no sandbox.
"""
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from llmlabs.auto import runs, sandbox
from llmlabs.auto.surface import RESEARCH_SURFACE, is_research_file
from llmlabs.common import LabError, atomic_write_json

MAX_FILE_CHARS = 200_000


def describe(text: str) -> str:
    """The agent's one-line description: the last non-empty line of its answer."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "(the agent gave no description)"


class CommandAgent:
    def __init__(self, cmd: str, timeout: float, hide=(), rw=()):
        """hide: directories the agent must not see (the session's, the data); rw: writable besides
        its worktree."""
        self.cmd, self.timeout, self.hide, self.rw = cmd, timeout, list(hide), list(rw)

    def step(self, prompt: str, wt, transcript: Path, env: dict) -> str:
        prompt_file, transcript = transcript.with_suffix(".prompt.md"), transcript.with_suffix(".log")
        prompt_file.write_text(prompt)
        file_mode = "{prompt_file}" in self.cmd
        argv = shlex.split(self.cmd.replace("{prompt_file}", shlex.quote(str(prompt_file))))
        if sandbox.available():
            ro = [prompt_file, *{Path(p) for p in (sys.prefix, sys.base_prefix) if Path(p).exists()}]
            argv = sandbox.wrap(argv, rw=[wt, *self.rw], ro=ro, hide=self.hide, net=True, chdir=wt)
        try:
            proc = subprocess.Popen(argv, cwd=wt, env={**os.environ, **env}, text=True, start_new_session=True,
                                    stdin=subprocess.DEVNULL if file_mode else subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise LabError(f"--agent {self.cmd!r} cannot start: {e}") from None
        start, pending = time.time(), None if file_mode else prompt
        while True:
            try:
                out, err = proc.communicate(pending, timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pending = None
                if runs.STOP.is_set() or time.time() - start > self.timeout:
                    runs.kill_group(proc)
                    if runs.STOP.is_set():
                        raise KeyboardInterrupt from None
                    raise LabError(f"agent {self.cmd!r} ran past --agent-timeout {self.timeout:g} s") from None
        transcript.write_text(f"$ {self.cmd}\n# exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}")
        if proc.returncode:
            raise LabError(f"agent {self.cmd!r} exited with code {proc.returncode}: "
                           f"{describe(err or out)} (see {transcript})")
        return describe(out)


TOOLS = [
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the lab (path relative to the repository root).",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "edit_file",
        "description": "Replace the one occurrence of old_string with new_string in a research file.",
        "parameters": {"type": "object", "properties": {
            "path": {"type": "string"}, "old_string": {"type": "string"}, "new_string": {"type": "string"}},
            "required": ["path", "old_string", "new_string"]}}},
    {"type": "function", "function": {
        "name": "write_file", "description": "Replace the whole content of a research file.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                       "required": ["path", "content"]}}},
]


class Tools:
    """The OpenAI agent's hands: read anything in the worktree, write only the research surface."""

    def __init__(self, wt):
        self.wt = Path(wt).resolve()

    def _path(self, rel):
        path = (self.wt / str(rel)).resolve()
        if self.wt not in path.parents or ".git" in path.relative_to(self.wt).parts:
            raise ValueError(f"{rel}: outside the lab's files")
        return path

    def _writable(self, rel):
        path = self._path(rel)
        if not is_research_file(str(path.relative_to(self.wt))):
            raise ValueError(f"{rel} is not on the research surface; you may edit only: {', '.join(RESEARCH_SURFACE)}")
        return path

    def read_file(self, path):
        p = self._path(path)
        if not p.is_file():
            raise ValueError(f"{path}: no such file")
        return p.read_text(errors="replace")[:MAX_FILE_CHARS]

    def edit_file(self, path, old_string, new_string):
        p = self._writable(path)
        text = p.read_text() if p.exists() else ""
        n = text.count(old_string) if old_string else 0
        if n != 1:
            raise ValueError(f"old_string occurs {n} times in {path}; it must occur exactly once (add context)")
        p.write_text(text.replace(old_string, new_string))
        return f"edited {path}"

    def write_file(self, path, content):
        p = self._writable(path)
        p.write_text(content)
        return f"wrote {len(content)} characters to {path}"

    def call(self, name, arguments: str) -> str:
        try:
            args = json.loads(arguments or "{}")
            if name not in ("read_file", "edit_file", "write_file"):
                raise ValueError(f"unknown tool {name!r}")
            return getattr(self, name)(**args)
        except (ValueError, TypeError, OSError) as e:  # the model reads the error and tries again
            return f"error: {e}"


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    # urllib re-sends the Authorization header to whatever host a redirect names; a chat completions
    # POST has no legitimate redirect, so none is followed and the 3xx surfaces as an HTTPError
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_NO_REDIRECTS = urllib.request.build_opener(_RefuseRedirects)


class OpenAIAgent:
    def __init__(self, url: str, model: str, key_env: str, timeout: float, max_turns: int = 40):
        if not model:
            raise LabError("--agent openai:URL needs --model NAME (the model the endpoint serves)")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):  # a pasted key itself, never echoed in full
            raise LabError(f"--key-env takes the name of the environment variable that holds the key (e.g. "
                           f"OPENAI_API_KEY), not a key: got {len(key_env)} characters starting {key_env[:3]!r}")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model, self.key_env, self.timeout, self.max_turns = model, key_env, timeout, max_turns

    def _redact(self, text):
        key = os.environ.get(self.key_env)
        return text.replace(key, "***") if key else text

    def _post(self, payload, timeout) -> dict:
        headers = {"Content-Type": "application/json"}
        if os.environ.get(self.key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.key_env]}"
        req = urllib.request.Request(self.endpoint, data=json.dumps(payload).encode(), headers=headers)
        for attempt in range(4):  # rate limits and restarts of a local server are transient
            try:
                with _NO_REDIRECTS.open(req, timeout=timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    where = self._redact(e.headers.get("Location") or "no Location")[:200]
                    raise LabError(f"{self.endpoint} answered a redirect (HTTP {e.code} to {where}): refused, "
                                   "the key is never sent on; point --agent at the final URL") from None
                body = e.read().decode(errors="replace")[:300]
                if e.code not in (429, 500, 502, 503, 504) or attempt == 3:
                    hint = f" (is ${self.key_env} set?)" if e.code in (401, 403) else ""
                    raise LabError(f"{self.endpoint} answered HTTP {e.code}{hint}: {self._redact(body)}") from None
            except (urllib.error.URLError, OSError) as e:
                if attempt == 3:
                    raise LabError(f"cannot reach {self.endpoint}: {self._redact(str(e))}") from None
            if runs.STOP.is_set():
                raise KeyboardInterrupt
            time.sleep(2 ** attempt)

    def step(self, prompt: str, wt, transcript: Path, env: dict) -> str:
        system, _, user = prompt.partition(PROMPT_SPLIT)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        tools, transcript = Tools(wt), transcript.with_suffix(".json")
        deadline = time.time() + self.timeout
        try:
            for _ in range(self.max_turns):
                if runs.STOP.is_set():
                    raise KeyboardInterrupt
                if time.time() > deadline:
                    raise LabError(f"agent {self.endpoint} ran past --agent-timeout {self.timeout:g} s")
                reply = self._post({"model": self.model, "messages": messages, "tools": TOOLS},
                                   timeout=max(1.0, deadline - time.time()))
                try:
                    msg = reply["choices"][0]["message"]
                except (KeyError, IndexError, TypeError):
                    raise LabError(f"{self.endpoint} sent no choices[0].message: {self._redact(str(reply)[:200])}") from None
                messages.append({k: v for k, v in msg.items() if v is not None})
                calls = msg.get("tool_calls") or []
                if not calls:
                    return describe(msg.get("content"))
                for c in calls:
                    result = tools.call(c["function"]["name"], c["function"].get("arguments"))
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": result})
            return f"(the agent used all its {self.max_turns} turns without a final answer)"
        finally:
            atomic_write_json(transcript, {"endpoint": self.endpoint, "model": self.model, "messages": messages})


# the loop's prompt is program.md, this marker, then the iteration's part; the OpenAI agent sends
# the first as the system message, a command agent gets the whole text
PROMPT_SPLIT = "\n\n<!-- iteration -->\n\n"


def make_agent(spec: str, model: str | None, key_env: str, timeout: float, hide=(), rw=()):
    if spec.startswith("openai:"):
        return OpenAIAgent(spec[len("openai:"):], model, key_env, timeout)
    if not spec.strip():
        raise LabError("--agent is empty: give a command (e.g. \"claude -p\") or openai:URL")
    missing = [p for p in rw if not Path(p).exists()]
    if missing:
        raise LabError(f"--agent-rw {missing[0]}: no such file or directory (give the agent CLI's existing state "
                       "directory, e.g. ~/.claude)")
    return CommandAgent(spec, timeout, hide, rw)
