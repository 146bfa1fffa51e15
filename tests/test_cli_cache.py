"""`sljax serve --compilation-cache`: a restarted server loads its compiled steps instead of compiling them."""

import os
import signal
import subprocess
import sys
import threading

PROCESS_TIMEOUT = 300


def _serve(tmp_path, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
  """`sljax serve` (a tiny MLP) that stops as soon as it listens; its log in tmp_path/<name>.log."""
  tokens = tmp_path / "tokens.txt"
  tokens.write_text("0 cache-test-token\n")
  port_file = tmp_path / f"port-{name}"
  cmd = [sys.executable, "-m", "sljax.cli", "serve", "--port", "0", "--port-file", str(port_file), "--token-file",
         str(tokens), "--hidden", "8", "--rounds", "1", "--local-steps", "1", "--batch-size", "4", *args]
  with open(tmp_path / f"{name}.log", "w") as log:
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)

  def stop_once_listening():
    for _ in range(PROCESS_TIMEOUT * 20):
      if port_file.exists() or process.poll() is not None:
        break
      threading.Event().wait(0.05)
    if process.poll() is None:
      process.send_signal(signal.SIGTERM)

  threading.Thread(target=stop_once_listening, daemon=True).start()
  return process


def _finish(tmp_path, name: str, process: subprocess.Popen) -> None:
  try:
    process.wait(timeout=PROCESS_TIMEOUT)
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()
  assert process.returncode == 0, (tmp_path / f"{name}.log").read_text()[-3000:]


def _env(**values: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  return {**env, **values}


def _entries(directory) -> set[str]:
  return set(os.listdir(directory)) if os.path.isdir(directory) else set()


def test_compilation_cache_is_written_then_hit_and_no_compilation_cache_writes_none(tmp_path):
  default = tmp_path / "xdg" / "sljax" / "xla"  # the default: $XDG_CACHE_HOME/sljax/xla
  env_dir, other_home = tmp_path / "env-cache", tmp_path / "xdg-unused"
  cached = _serve(tmp_path, "cached", env=_env(XDG_CACHE_HOME=str(tmp_path / "xdg")))
  # --no-compilation-cache also overrides a cache set through jax's environment variable.
  uncached = _serve(tmp_path, "uncached", "--no-compilation-cache",
                    env=_env(XDG_CACHE_HOME=str(other_home), JAX_COMPILATION_CACHE_DIR=str(env_dir)))
  _finish(tmp_path, "cached", cached)
  _finish(tmp_path, "uncached", uncached)
  written = _entries(default)
  assert any(name.startswith("jit_server_step-") for name in written), sorted(written)
  assert _entries(env_dir) == set() and _entries(other_home / "sljax" / "xla") == set()

  # The same server again, the directory given explicitly: every program is found, none is added.
  again = _serve(tmp_path, "again", "--compilation-cache", str(default), env=_env(XDG_CACHE_HOME=str(other_home)))
  _finish(tmp_path, "again", again)
  assert _entries(default) == written
  assert _entries(other_home / "sljax" / "xla") == set()
