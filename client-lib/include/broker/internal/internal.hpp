// Guard for the private headers: only the project's own targets may include them.
#pragma once
#ifndef BROKER_INTERNAL
#error "broker/internal/* are private to brokerd; use <broker/client.hpp>"
#endif
