-- @description stemquery: Settings (hot folder, engine, refine, output format)
-- @version 0.1.0
-- @author stemquery
-- @about
--   The hot folder must be the one `stemquery serve` watches (default ~/stemquery). Engine: empty for the
--   server's default, or a name from `stemquery engines`. Refine: 1 to run the diffusion refiner when the
--   server has one. Format: wav or flac. Kept across REAPER sessions.
-- @provides
--   [main] .
--   [nomain] stemquery_common.lua
local folder = ({ reaper.get_action_context() })[2]:match("^(.*[/\\])")
local stemquery = dofile(folder .. "stemquery_common.lua")

local KEYS = { "hotfolder", "engine", "refine", "format" }

local function run()
  local current = stemquery.settings()
  local values = {}
  for i, key in ipairs(KEYS) do values[i] = current[key] end
  local ok, answer = reaper.GetUserInputs("stemquery settings", #KEYS,
    "Hot folder,Engine (empty = server default),Refine (0/1),Format (wav/flac),extrawidth=300",
    table.concat(values, ","))
  if not ok then return end
  local fields = {}
  for field in (answer .. ","):gmatch("([^,]*),") do fields[#fields + 1] = field end
  if fields[3] ~= "0" and fields[3] ~= "1" then stemquery.message("Refine must be 0 or 1."); return end
  if fields[4] ~= "wav" and fields[4] ~= "flac" then stemquery.message("Format must be wav or flac."); return end
  for i, key in ipairs(KEYS) do stemquery.save_setting(key, fields[i]) end
  local running, status = stemquery.server_running(fields[1])
  if not running then stemquery.message("Saved. " .. status .. " --hotfolder " .. fields[1]) end
end

run()
