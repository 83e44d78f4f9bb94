"""Fixtures: in-process services on free ports, closed after each test."""

import pytest

from tests.transport.helpers import Service


@pytest.fixture
def service():
    svc = Service()
    yield svc
    svc.close()


@pytest.fixture
def make_service():
    made = []

    def make(**broker_kwargs):
        made.append(Service(broker_kwargs))
        return made[-1]

    yield make
    for svc in made:
        svc.close()
