"""`GET /metrics`: behind the token, and counting what the gateway does."""

from __future__ import annotations

import json

import httpx
from gateway.conftest import GatewayServer
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from .conftest import CI_TOKEN

AUTH = {"Authorization": f"Bearer {CI_TOKEN}"}


async def sample(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    response = await http.get("/metrics", headers=AUTH)
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for metric in family.samples:
            if metric.name == name and all(metric.labels.get(k) == v for k, v in labels.items()):
                return metric.value
    return 0.0


async def test_metrics_count_clients_events_commands_and_errors(
    secured: GatewayServer, anonymous: httpx.AsyncClient, session_id: str
) -> None:
    assert (await anonymous.get("/metrics")).status_code == 401

    commands = await sample(
        anonymous, "stepwise_gateway_commands_published_total", type="generate_plan"
    )
    unauthorized = await sample(
        anonymous, "stepwise_gateway_http_errors_total", status_class="4xx", status="401"
    )
    sent = await sample(anonymous, "stepwise_gateway_events_sent_total", transport="websocket")
    clients = await sample(anonymous, "stepwise_gateway_websocket_clients")

    created = await anonymous.post(
        "/api/sessions",
        json={"test_case": "Open the home page", "target_url": "http://127.0.0.1:9/"},
        headers=AUTH,
    )
    assert created.status_code == 201
    for _ in range(3):
        assert (await anonymous.get("/api/sessions")).status_code == 401

    url = f"{secured.ws_url}/api/sessions/{session_id}/ws"
    async with connect(url, additional_headers=AUTH, open_timeout=10) as socket:
        # build_session's plan_ready session has three events.
        seqs = [json.loads(await socket.recv(decode=True))["seq"] for _ in range(3)]
        assert seqs == [1, 2, 3]
        assert await sample(anonymous, "stepwise_gateway_websocket_clients") == clients + 1
        assert (
            await sample(anonymous, "stepwise_gateway_events_sent_total", transport="websocket")
            == sent + 3
        )

    after_commands = await sample(
        anonymous, "stepwise_gateway_commands_published_total", type="generate_plan"
    )
    after_unauthorized = await sample(
        anonymous, "stepwise_gateway_http_errors_total", status_class="4xx", status="401"
    )
    assert after_commands == commands + 1
    assert after_unauthorized == unauthorized + 3
