from rlhf.redact import REDACTED, env_secrets, is_secret_name, redact


def test_secret_names_match_tokens_keys_and_passwords_but_not_token_counts():
    for name in ["HF_TOKEN", "WANDB_API_KEY", "OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "hf_token",
                 "api_key", "apikey", "MY_SERVICE_KEY", "GITHUB_TOKEN", "client_secret", "credentials"]:
        assert is_secret_name(name), name
    for name in ["max_prompt_tokens", "max_new_tokens", "eos_token_id", "keep_last", "prompt_column", "monkey", "PATH",
                 "HOME"]:
        assert not is_secret_name(name), name


def test_env_secret_values_token_formats_and_url_passwords_are_replaced():
    env = {"HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz", "MY_KEY": "0123456789abcdef", "SHORT_KEY": "abc",
           "PATH": "/usr/bin"}
    secrets = env_secrets(env)
    assert "abc" not in secrets and "/usr/bin" not in secrets  # too short to redact safely / not a secret name
    record = {
        "note": "key=0123456789abcdef and /usr/bin",
        "openai": "sk-" + "x" * 30, "github": "ghp_" + "y" * 36, "aws": "AKIAABCDEFGHIJKLMNOP",
        "url": "postgres://alice:hunter22@db:5432/x", "nested": [{"api_key": "anything"}, ("hf_" + "z" * 30,)],
        "empty_token": None, "step": 3,
    }
    out = redact(record, secrets)
    assert out["note"] == f"key={REDACTED} and /usr/bin"
    assert out["openai"] == out["github"] == out["aws"] == REDACTED
    assert out["url"] == f"postgres://alice:{REDACTED}@db:5432/x"
    assert out["nested"] == [{"api_key": REDACTED}, (REDACTED,)]
    assert out["empty_token"] is None and out["step"] == 3
    assert record["nested"][0]["api_key"] == "anything"  # the input is not modified
