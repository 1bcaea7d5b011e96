{
 "patcher": {
  "fileversion": 1,
  "appversion": {
   "major": 8,
   "minor": 6,
   "revision": 0,
   "architecture": "x64",
   "modernui": 1
  },
  "classnamespace": "box",
  "rect": [
   100,
   100,
   720,
   560
  ],
  "bglocked": 0,
  "openinpresentation": 0,
  "default_fontsize": 12.0,
  "gridsize": [
   15.0,
   15.0
  ],
  "boxes": [
   {
    "box": {
     "id": "c1",
     "maxclass": "comment",
     "patching_rect": [
      20,
      10,
      680,
      22
     ],
     "numinlets": 1,
     "numoutlets": 0,
     "text": "stemquery: drop a mix and a query file, click the button. Several stems: click a stem list below (edit it first: names and/or name=/abs/clip.wav). Replies come back on port 9131 (reply_port)."
    }
   },
   {
    "box": {
     "id": "mixdrop",
     "maxclass": "dropfile",
     "patching_rect": [
      20,
      40,
      200,
      22
     ],
     "numinlets": 1,
     "numoutlets": 2,
     "outlettype": [
      "",
      ""
     ]
    }
   },
   {
    "box": {
     "id": "c2",
     "maxclass": "comment",
     "patching_rect": [
      60,
      60,
      120,
      22
     ],
     "numinlets": 1,
     "numoutlets": 0,
     "text": "drop MIX here"
    }
   },
   {
    "box": {
     "id": "qdrop",
     "maxclass": "dropfile",
     "patching_rect": [
      240,
      40,
      200,
      22
     ],
     "numinlets": 1,
     "numoutlets": 2,
     "outlettype": [
      "",
      ""
     ]
    }
   },
   {
    "box": {
     "id": "c3",
     "maxclass": "comment",
     "patching_rect": [
      280,
      60,
      120,
      22
     ],
     "numinlets": 1,
     "numoutlets": 0,
     "text": "drop QUERY here"
    }
   },
   {
    "box": {
     "id": "mixpath",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      110,
      180,
      22
     ],
     "numinlets": 1,
     "numoutlets": 2,
     "text": "conformpath native absolute",
     "outlettype": [
      "",
      "int"
     ]
    }
   },
   {
    "box": {
     "id": "qpath",
     "maxclass": "newobj",
     "patching_rect": [
      240,
      110,
      180,
      22
     ],
     "numinlets": 1,
     "numoutlets": 2,
     "text": "conformpath native absolute",
     "outlettype": [
      "",
      "int"
     ]
    }
   },
   {
    "box": {
     "id": "mixsym",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      140,
      80,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "tosymbol"
    }
   },
   {
    "box": {
     "id": "qsym",
     "maxclass": "newobj",
     "patching_rect": [
      240,
      140,
      80,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "tosymbol"
    }
   },
   {
    "box": {
     "id": "mixset",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      170,
      80,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "prepend set"
    }
   },
   {
    "box": {
     "id": "dirname",
     "maxclass": "newobj",
     "patching_rect": [
      110,
      170,
      80,
      22
     ],
     "numinlets": 1,
     "numoutlets": 2,
     "text": "strippath",
     "outlettype": [
      "",
      ""
     ]
    }
   },
   {
    "box": {
     "id": "c4",
     "maxclass": "comment",
     "patching_rect": [
      460,
      80,
      240,
      22
     ],
     "numinlets": 1,
     "numoutlets": 0,
     "text": "stems go beside the mix: its folder must be under the server's --allow-root"
    }
   },
   {
    "box": {
     "id": "go",
     "maxclass": "button",
     "patching_rect": [
      460,
      110,
      30,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "outlettype": [
      "bang"
     ]
    }
   },
   {
    "box": {
     "id": "pack",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      210,
      200,
      22
     ],
     "numinlets": 3,
     "numoutlets": 1,
     "text": "pack s s s"
    }
   },
   {
    "box": {
     "id": "msg",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      240,
      260,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "prepend /stemquery/separate max-req"
    }
   },
   {
    "box": {
     "id": "opts",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      270,
      200,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "append reply_port 9131"
    }
   },
   {
    "box": {
     "id": "send",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      320,
      180,
      22
     ],
     "numinlets": 1,
     "numoutlets": 0,
     "text": "udpsend 127.0.0.1 9130"
    }
   },
   {
    "box": {
     "id": "recv",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      350,
      180,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "udpreceive 9131 @defer 1"
    }
   },
   {
    "box": {
     "id": "route",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      380,
      560,
      22
     ],
     "numinlets": 1,
     "numoutlets": 6,
     "text": "route /stemquery/accepted /stemquery/progress /stemquery/stem /stemquery/done /stemquery/error"
    }
   },
   {
    "box": {
     "id": "prog",
     "maxclass": "newobj",
     "patching_rect": [
      120,
      410,
      140,
      22
     ],
     "numinlets": 1,
     "numoutlets": 4,
     "text": "unpack s s f s",
     "outlettype": [
      "",
      "",
      "float",
      ""
     ]
    }
   },
   {
    "box": {
     "id": "scale",
     "maxclass": "newobj",
     "patching_rect": [
      120,
      440,
      60,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "* 100."
    }
   },
   {
    "box": {
     "id": "bar",
     "maxclass": "slider",
     "patching_rect": [
      120,
      470,
      240,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "orientation": 1,
     "size": 101.0,
     "outlettype": [
      ""
     ]
    }
   },
   {
    "box": {
     "id": "stemunpack",
     "maxclass": "newobj",
     "patching_rect": [
      280,
      410,
      140,
      22
     ],
     "numinlets": 1,
     "numoutlets": 3,
     "text": "unpack s s s",
     "outlettype": [
      "",
      "",
      ""
     ]
    }
   },
   {
    "box": {
     "id": "paths",
     "maxclass": "message",
     "patching_rect": [
      280,
      440,
      360,
      22
     ],
     "numinlets": 2,
     "numoutlets": 1,
     "text": ""
    }
   },
   {
    "box": {
     "id": "done",
     "maxclass": "message",
     "patching_rect": [
      420,
      470,
      100,
      22
     ],
     "numinlets": 2,
     "numoutlets": 1,
     "text": "done"
    }
   },
   {
    "box": {
     "id": "err",
     "maxclass": "message",
     "patching_rect": [
      20,
      500,
      240,
      22
     ],
     "numinlets": 2,
     "numoutlets": 1,
     "text": ""
    }
   },
   {
    "box": {
     "id": "livejs",
     "maxclass": "newobj",
     "patching_rect": [
      280,
      500,
      200,
      22
     ],
     "numinlets": 1,
     "numoutlets": 0,
     "text": "js stemquery_live_clip.js"
    }
   },
   {
    "box": {
     "id": "stemsmsg",
     "maxclass": "message",
     "patching_rect": [
      470,
      180,
      230,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "stem bass stem drums stem keys",
     "outlettype": [
      ""
     ]
    }
   },
   {
    "box": {
     "id": "stemsone",
     "maxclass": "message",
     "patching_rect": [
      470,
      210,
      230,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "stem guitar=/Users/me/Music/lick.wav",
     "outlettype": [
      ""
     ]
    }
   },
   {
    "box": {
     "id": "stemsclear",
     "maxclass": "message",
     "patching_rect": [
      470,
      240,
      60,
      22
     ],
     "numinlets": 1,
     "numoutlets": 1,
     "text": "zlclear",
     "outlettype": [
      ""
     ]
    }
   },
   {
    "box": {
     "id": "c5",
     "maxclass": "comment",
     "patching_rect": [
      540,
      240,
      180,
      22
     ],
     "numinlets": 1,
     "numoutlets": 0,
     "text": "back to one stem (target)"
    }
   },
   {
    "box": {
     "id": "join",
     "maxclass": "newobj",
     "patching_rect": [
      20,
      295,
      200,
      22
     ],
     "numinlets": 2,
     "numoutlets": 2,
     "text": "zl join",
     "outlettype": [
      "",
      ""
     ]
    }
   }
  ],
  "lines": [
   {
    "patchline": {
     "source": [
      "mixdrop",
      0
     ],
     "destination": [
      "mixpath",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "qdrop",
      0
     ],
     "destination": [
      "qpath",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "mixpath",
      0
     ],
     "destination": [
      "mixsym",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "qpath",
      0
     ],
     "destination": [
      "qsym",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "mixsym",
      0
     ],
     "destination": [
      "mixset",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "mixset",
      0
     ],
     "destination": [
      "pack",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "mixsym",
      0
     ],
     "destination": [
      "dirname",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "dirname",
      1
     ],
     "destination": [
      "pack",
      2
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "qsym",
      0
     ],
     "destination": [
      "pack",
      1
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "go",
      0
     ],
     "destination": [
      "pack",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "pack",
      0
     ],
     "destination": [
      "msg",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "msg",
      0
     ],
     "destination": [
      "opts",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "recv",
      0
     ],
     "destination": [
      "route",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "route",
      1
     ],
     "destination": [
      "prog",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "prog",
      2
     ],
     "destination": [
      "scale",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "scale",
      0
     ],
     "destination": [
      "bar",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "route",
      2
     ],
     "destination": [
      "stemunpack",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "stemunpack",
      2
     ],
     "destination": [
      "paths",
      1
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "stemunpack",
      2
     ],
     "destination": [
      "livejs",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "route",
      3
     ],
     "destination": [
      "done",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "route",
      4
     ],
     "destination": [
      "err",
      1
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "opts",
      0
     ],
     "destination": [
      "join",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "join",
      0
     ],
     "destination": [
      "send",
      0
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "stemsmsg",
      0
     ],
     "destination": [
      "join",
      1
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "stemsone",
      0
     ],
     "destination": [
      "join",
      1
     ]
    }
   },
   {
    "patchline": {
     "source": [
      "stemsclear",
      0
     ],
     "destination": [
      "join",
      0
     ]
    }
   }
  ],
  "description": "stemquery OSC client: separate a dropped mix with a dropped query file",
  "tags": "stemquery osc separation"
 }
}
