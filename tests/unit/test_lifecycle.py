"""How a consumer service's run ends, as its process exit code (`run_batch_service`)."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaConnectionError, ProducerFenced

from shared.errors import ConfigError
from shared.lifecycle import run_batch_service


async def _ends_with(error: BaseException | None) -> None:
    if error is not None:
        raise error


def test_a_clean_stop_exits_0() -> None:
    assert run_batch_service("svc", _ends_with(None)) == 0


def test_a_configuration_it_cannot_start_with_exits_2_and_says_why(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_batch_service("svc", _ends_with(ConfigError("RULES missing"))) == 2
    assert "svc: cannot start: RULES missing" in capsys.readouterr().err


def test_the_service_chooses_what_it_cannot_start_with() -> None:
    class RulesBroken(Exception):
        pass

    ended = run_batch_service("svc", _ends_with(RulesBroken("bad")), cannot_start=(RulesBroken,))
    assert ended == 2


@pytest.mark.parametrize("error", [ProducerFenced(), KafkaConnectionError("no broker")])
def test_fenced_or_dependencies_unreachable_exit_1(error: BaseException) -> None:
    assert run_batch_service("svc", _ends_with(error)) == 1


def test_a_bug_is_not_swallowed() -> None:
    with pytest.raises(ZeroDivisionError):
        run_batch_service("svc", _ends_with(ZeroDivisionError()))
