// stemquery → Ableton Live 12.0.5+: put a separated stem on a new audio track as an arrangement clip.
// In a Max for Live device, [js stemquery_live_clip.js] receives each stem path from /stemquery/stem.
// Live 12.0.5 added Track.create_audio_clip(file_path, position) to the Live Object Model.
autowatch = 1;
inlets = 1;
outlets = 0;

function anything() {
    var path = arrayfromargs(messagename, arguments).join(" ");
    var song = new LiveAPI("live_set");
    song.call("create_audio_track", -1);                  // a new track at the end
    var count = song.getcount("tracks");
    var track = new LiveAPI("live_set tracks " + (count - 1));
    track.call("create_audio_clip", path, 0.0);           // at the start of the arrangement (beat 0)
    post("stemquery: added " + path + "\n");
}
