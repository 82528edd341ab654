-- Argo CD health of an embedshift.io EmbeddingMigration, read from the status the operator
-- writes (operator/embedshift_operator/resource.py: Phase, ConditionType). Argo CD runs it with
-- the resource as `obj`; install it as resource.customizations.health.embedshift.io_EmbeddingMigration
-- (charts/embedshift/README.md, "Argo CD and Flux"). tests/chart/test_argocd_health.py runs it
-- against statuses read back from a real API server.
local hs = {}

-- Phases that end well, wait for a person, or went wrong; every other known phase is work the
-- operator is still doing. A phase a newer operator adds is Unknown, not a guess.
local healthy = { Succeeded = true }
local suspended = { Paused = true }
local degraded = { RolledBack = true, Failed = true }
local progressing = {
  Pending = true, Preparing = true, Migrating = true, Indexing = true, Verifying = true,
  Progressing = true, Promoted = true,
}

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to write a status"
  return hs
end

-- A status older than the spec says nothing about it yet (kstatus reads observedGeneration the
-- same way; a status without it is taken as current, as kstatus does).
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = string.format("waiting for the operator to observe generation %d", generation)
  return hs
end

local ready = nil
local stalled = nil
if status.conditions ~= nil then
  for _, condition in ipairs(status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    elseif condition.type == "Stalled" and condition.status == "True" then
      stalled = condition
    end
  end
end

local phase = status.phase
-- Stalled True: nothing moves until a person acts. In Failed and RolledBack (Degraded anyway)
-- Ready says why; in any other phase it is the operator refusing the spec (ImageNotAllowed,
-- EndpointNotAllowed: its allowlists), and Stalled's message says what to change.
local held = stalled ~= nil and not degraded[phase]
local why = ready
if held then
  why = stalled
end
local message = string.format("%s at %d%% to v2", phase, status.percentage or 0)
if why ~= nil then
  -- The Ready reason is the phase itself unless something else holds it (DatabaseUnreachable).
  if why.reason ~= nil and why.reason ~= "" and why.reason ~= phase then
    message = message .. " (" .. why.reason .. ")"
  end
  if why.message ~= nil and why.message ~= "" then
    message = message .. ": " .. why.message
  end
end
hs.message = message

if held then
  hs.status = "Degraded"
elseif healthy[phase] then
  hs.status = "Healthy"
elseif suspended[phase] then
  hs.status = "Suspended"
elseif degraded[phase] then
  hs.status = "Degraded"
elseif progressing[phase] then
  hs.status = "Progressing"
else
  hs.status = "Unknown"
end
return hs
