"""Async mode: each feature registers its `async def` routes with everything but the I/O taken from the sync twin."""

from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter
from fastapi.routing import APIRoute

Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def twins(router: APIRouter, async_router: APIRouter) -> Callable[[Callable[..., Any]], Callable[[Endpoint], Endpoint]]:
    """`same_route_as(sync_endpoint)`: a decorator that puts an async route on `async_router` with the path,
    response model, status, docs and error responses of its sync twin on `router`."""

    def same_route_as(sync_endpoint: Callable[..., Any]) -> Callable[[Endpoint], Endpoint]:
        twin = next(r for r in router.routes if isinstance(r, APIRoute) and r.endpoint is sync_endpoint)

        def register(endpoint: Endpoint) -> Endpoint:
            async_router.add_api_route(
                twin.path,
                endpoint,
                methods=list(twin.methods),
                response_model=twin.response_model,
                status_code=twin.status_code,
                tags=twin.tags,
                summary=twin.summary,
                description=twin.description,
                responses=twin.responses,
                name=twin.name,
            )
            return endpoint

        return register

    return same_route_as
