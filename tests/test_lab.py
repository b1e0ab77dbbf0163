"""JupyterLab starts headless on loopback, lists the notebooks and offers the project's kernel."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import ROOT, tool


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, token):
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_jupyterlab_lists_notebooks_with_project_kernel(tmp_path):
    port, token = _free_port(), "lexvla-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [tool("jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--allow-root",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT / 'notebooks'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                contents = _get(f"{base}/api/contents", token)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"jupyter lab did not start:\n{proc.stdout.read().decode()[-3000:]}")
                time.sleep(0.5)
        names = {c["name"] for c in contents["content"]}
        assert "00_params.ipynb" in names and "analysis" in names
        specs = _get(f"{base}/api/kernelspecs", token)["kernelspecs"]
        assert "lexvla" in specs, f"project kernel not installed; have {sorted(specs)}"
        assert specs["lexvla"]["spec"]["argv"][0] == sys.executable or \
            os.path.samefile(specs["lexvla"]["spec"]["argv"][0], sys.executable), "kernel does not run the project's venv"
        nb = _get(f"{base}/api/contents/00_params.ipynb", token)
        assert nb["content"]["metadata"]["kernelspec"]["name"] == "lexvla"
        # the lab UI itself is served
        with urllib.request.urlopen(urllib.request.Request(f"{base}/lab?token={token}"), timeout=10) as r:
            assert r.status == 200 and b"JupyterLab" in r.read()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
