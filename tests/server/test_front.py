"""The coordinator's front door (server/front.py), the fast part (on real processes:
tests/test_federation.py::test_strangers_reach_the_fleet_api_alone): of everything
Flower's SuperLink serves, strangers reach the Fleet API alone."""

from fastapi.routing import iter_route_contexts
from flwr.superlink.main import create_app

from fedclif.server.front import FLEET_PATHS, refusal


def _routes() -> dict[str, set[str]]:
    """Every path Flower's SuperLink serves, with its methods."""
    return {
        c.route.path: set(getattr(c.route, "methods", ()))
        for c in iter_route_contexts(create_app().routes)
    }


def test_the_front_passes_only_the_fleet_calls_of_flowers_superlink():
    """Of every route the SuperLink serves (Control, Runtime, docs, health, and whatever
    Flower adds), only the SuperNode's Fleet calls pass, as protobuf POSTs."""
    routes = _routes()
    assert set(routes) >= FLEET_PATHS  # a Fleet path Flower renamed would be noticed
    assert any(p.startswith("/v1/control/") for p in routes)
    assert any(p.startswith("/v1/runtime/") for p in routes)
    for path in routes:
        why = refusal("POST", path, "application/protobuf")
        if path in FLEET_PATHS:
            assert why is None
        else:
            assert why == "not a Fleet API path", path
    fleet = "/v1/fleet/pull-messages"
    assert refusal("GET", fleet, "application/protobuf") == "method GET"
    assert refusal("POST", fleet, "application/json") == "not a protobuf body"
    assert refusal("POST", fleet, "application/protobuf; charset=x") is None
    assert refusal("POST", fleet + "/", "application/protobuf") == "not a Fleet API path"
    assert refusal("POST", "/v1/fleet/../control/list-runs", "application/protobuf")
