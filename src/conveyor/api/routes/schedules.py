"""Schedules: the app's periodic tasks, when each runs next, and its latest tick's job."""

from __future__ import annotations

from fastapi import APIRouter

from conveyor.api.deps import CanRead, ConveyorDep
from conveyor.api.errors import ERROR_RESPONSES
from conveyor.api.schemas import SchedulePublic, SchedulesPublic

router = APIRouter(prefix="/schedules", tags=["schedules"], responses=ERROR_RESPONSES)


@router.get("", response_model=SchedulesPublic, summary="Periodic tasks, their next run and latest job")
async def list_schedules(conveyor: ConveyorDep, _principal: CanRead) -> SchedulesPublic:
    return SchedulesPublic(schedules=[SchedulePublic.of(status) for status in await conveyor.list_schedules()])
