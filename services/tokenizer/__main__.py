"""`infermesh tokenizer`: serve ``im.tokenize`` for the configured models."""

from infermesh.libs.runtime import StartupError, service_main
from infermesh.libs.tokenization import TokenizationError

from .config import TokenizerConfig
from .service import TokenizerService


def _build(cfg: TokenizerConfig) -> TokenizerService:
    svc = TokenizerService(cfg)
    try:
        svc.load_models()  # before anything listens: a bad folder fails the start loudly
    except TokenizationError as e:
        raise StartupError(str(e)) from None
    return svc


main = service_main("tokenizer", TokenizerConfig, _build,
                    "Run the tokenizer service: prompt or chat → token count and block keys.")

if __name__ == "__main__":
    raise SystemExit(main())
