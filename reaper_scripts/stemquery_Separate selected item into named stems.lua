-- @description stemquery: Separate selected item into named stems (bass, drums, keys, ...)
-- @version 0.1.0
-- @author stemquery
-- @about
--   Select one item (the mix) and type the stems you want by instrument name, separated by commas
--   ("bass, drums, keys"); `stemquery instruments` lists the names it has examples of. stemquery
--   (`stemquery serve`, running on this computer) separates all of them in one pass with its bundled example
--   of each instrument; each stem comes back as a new track under the mix's track, then the residual
--   (everything else), at the item's position, sample-aligned. The names are remembered for next time.
--   Progress shows in a small window; Esc cancels.
-- @provides
--   [main] .
--   [nomain] stemquery_common.lua
local folder = ({ reaper.get_action_context() })[2]:match("^(.*[/\\])")
local stemquery = dofile(folder .. "stemquery_common.lua")

local DEFAULT_NAMES = "bass, drums, keys"

local function run()
  local items = stemquery.selected_items()
  if #items ~= 1 then
    stemquery.message("Select exactly one item (the mix); you will then name the stems you want.")
    return
  end
  local mix, why = stemquery.item_audio(items[1])
  if not mix then stemquery.message("stemquery cannot use this item: " .. why); return end
  local last = reaper.GetExtState(stemquery.SECTION, "names")
  -- One field; the newline separator keeps the commas inside it.
  local ok, answer = reaper.GetUserInputs("stemquery: stems by name", 1,
    "Stems (comma-separated),separator=\n,extrawidth=250", last ~= "" and last or DEFAULT_NAMES)
  if not ok then return end
  local names = stemquery.parse_names(answer)
  if #names == 0 then stemquery.message("Name at least one stem, e.g. " .. DEFAULT_NAMES .. "."); return end
  local stems = {}
  for i, name in ipairs(names) do
    if name:lower() == "residual" then
      stemquery.message("'residual' is everything else and comes back anyway; name the instruments you want.")
      return
    end
    stems[i] = { name = name }
  end
  stemquery.save_setting("names", table.concat(names, ", "))
  stemquery.submit(mix, nil, nil, stems)
end

run()
