"""One log format for every process; httpx's line per request is left out, its warnings are not."""

import logging

import pytest

from broker.logs import configure_logging


def test_httpx_requests_stay_out_of_the_log_but_its_warnings_show(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level, httpx_level = root.handlers[:], root.level, logging.getLogger("httpx").level
    try:
        configure_logging(["hunter2"])
        logging.getLogger("httpx").info('HTTP Request: POST http://node/v1/completions "HTTP/1.1 200 OK"')
        logging.getLogger("httpx").warning("connection to hunter2 reset")
        logging.getLogger("api.proxy").info("proxied")
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("httpx").setLevel(httpx_level)
    assert "HTTP Request" not in err
    assert "connection to *** reset" in err and "proxied" in err
