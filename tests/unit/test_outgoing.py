import httpx

from conveyor.correlation import HEADER, bind_correlation_id, reset_correlation_id
from conveyor.outgoing import SharedClient, current_client, use_client


async def test_the_shared_client_is_made_on_first_use_and_then_reused() -> None:
    shared = SharedClient()
    assert not shared.made

    first = shared.get()

    assert shared.made
    assert shared.get() is first
    await shared.aclose()
    assert not shared.made
    assert first.is_closed


async def test_closing_a_shared_client_never_used_makes_none() -> None:
    shared = SharedClient()

    await shared.aclose()

    assert not shared.made


async def test_the_client_in_use_tags_requests_with_the_correlation_id() -> None:
    seen: list[httpx.Headers] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(204)

    shared = SharedClient(transport=httpx.MockTransport(answer))
    use_client(shared)
    token = bind_correlation_id("order-1")
    try:
        response = await current_client().get("http://example.test/")
    finally:
        reset_correlation_id(token)
        await shared.aclose()

    assert response.status_code == 204
    assert seen[0][HEADER] == "order-1"
