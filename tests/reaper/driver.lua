-- Runs one ReaScript against FakeReaper, then its reaper.defer loop (as REAPER would, ~30 times a second) until
-- it stops deferring or the time limit passes, and writes what the fake recorded as JSON.
--   lua5.4 driver.lua FACTS.lua PROJECT.lua SCRIPT.lua RECORD.json MAX_SECONDS
local facts_path, project_path, script_path, record_path, max_seconds = table.unpack(arg)
local here = arg[0]:match("^(.*[/\\])") or "./"
local Fake = dofile(here .. "fake_reaper.lua")
Fake.install(dofile(facts_path), dofile(project_path), script_path)

local ok, err = pcall(dofile, script_path)
local errors = {}
if not ok then errors[#errors + 1] = tostring(err) end
local deadline = os.time() + tonumber(max_seconds)
while ok and os.time() <= deadline do
  local run_ok, more = pcall(Fake.run_deferred)
  if not run_ok then errors[#errors + 1] = tostring(more); break end
  if not more then break end
  os.execute("sleep 0.03") -- the test driver may sleep; the scripts never do
end
local record = Fake.finish()
record.errors = errors
local f = assert(io.open(record_path, "w"))
f:write(Fake.encode(record))
f:close()
