"""The embedded English text (original prose, free to use) that the built-in tokenizer is trained on."""

from __future__ import annotations

# Each passage is plain prose written for this project. Changing a single character changes the
# trained tokenizer, so the built-in model's cache directory name must be bumped with any edit.
PASSAGES: tuple[str, ...] = (
    """The lighthouse stood at the end of a long spit of rock, and every evening at a quarter past
six the keeper climbed its one hundred and twelve steps to light the lamp. He had done this for
twenty-three years. In the early days he counted the steps out loud, because the stairs were steep
and the iron rail was cold, but now his feet knew the way and his mind was free to wander. He
thought about the ships that passed in the night, about the men and women on board who would never
know his name, and about the small brown bird that had nested under the gallery every spring since
the winter of the great storm. When the lamp was lit he wrote three lines in the log: the time, the
weather, and anything unusual he had seen. Most nights there was nothing unusual at all.""",
    """To bake a simple loaf of bread you need only four things: flour, water, salt and yeast. Mix
five hundred grams of strong white flour with ten grams of salt and seven grams of dried yeast.
Pour in three hundred and fifty millilitres of warm water and stir until a rough dough forms. Turn
it out onto the table and knead it for ten minutes, pushing it away with the heel of your hand and
folding it back towards you, until it feels smooth and springs back when you press it. Leave it in
a covered bowl somewhere warm for about an hour, or until it has doubled in size. Shape it gently,
place it in a greased tin, let it rise again for thirty minutes, and bake it at 220 degrees for
half an hour. The loaf is done when it sounds hollow as you tap the bottom. Let it cool before you
cut it, however hard that may be.""",
    """The river begins as a trickle of melted snow high in the hills, where the grass is short and
the sheep wander without fences. By the time it reaches the first village it is wide enough to
need a bridge, and by the market town it carries barges loaded with timber, grain and coal. Along
its banks there are mills that once ground corn, boathouses painted green and white, and meadows
that flood each winter and turn silver under the low sun. Herons stand motionless in the shallows.
Children throw sticks from one side of the bridge and race across to see whose stick appears first
on the other side. Near the sea the river slows and spreads into marshes full of reeds, mud and
wading birds, and at last it loses itself in the grey salt water of the estuary.""",
    """A mechanical clock is a machine for dividing time into equal pieces. At its heart is the
escapement, a small device that lets the gear train advance by one tooth at a time. A weight or a
coiled spring provides the power, which would otherwise spin the wheels in a single rush. The
pendulum, or in a watch the balance wheel, swings back and forth at a steady rate, and each swing
releases the escapement once. Because the period of a pendulum depends mainly on its length, the
clockmaker can adjust the speed by raising or lowering the bob with a nut at the bottom. Turn the
nut to the right and the clock runs faster; turn it to the left and it runs slower. A good clock
may gain or lose only a few seconds in a week, which is remarkable for a thing made of brass,
steel and patience.""",
    """Dear Margaret,

I arrived in the city on Tuesday after a journey of nearly eleven hours. The train was crowded as
far as the border, and then almost empty, so I had a whole compartment to myself for the last part
of the trip. I watched the fields turn from yellow to green and the farmhouses change from brick to
stone. My lodgings are on the third floor of a narrow house above a bakery, which means that I wake
every morning to the smell of fresh rolls. The landlady, Mrs. Okafor, is kind but strict about the
front door, which must be locked by ten o'clock. Tomorrow I begin work at the museum. I am nervous,
of course, but also glad to be here at last. Please give my love to Father and tell him that I have
not forgotten my promise to write every week.

With warm wishes,
Eleanor""",
    """Once upon a time a fox found a crow sitting on the branch of an oak tree with a piece of
cheese in her beak. The fox was hungry, and he wanted the cheese very much. "Good morning, madam,"
he called up to her. "What beautiful feathers you have! So black and so glossy. I have heard it
said that your voice is even finer than your feathers. Would you sing a song for a poor traveller?"
The crow was pleased by the praise. She opened her beak to sing, and the cheese fell to the ground,
where the fox snapped it up at once. "Thank you," said the fox, licking his lips. "You have a
lovely voice, it is true, but you would do well to have a little more sense." And he trotted away
into the wood, leaving the crow to think about what had happened.""",
    """In March the garden looks tired and bare, but the soil is already waking up. This is the
time to dig over the beds, to add compost, and to sow the first seeds under glass: tomatoes,
peppers, lettuce and sweet peas. In April the days grow longer and the potatoes go into the ground
in rows about sixty centimetres apart. May brings the risk of a late frost, so the young plants
must be hardened off slowly, spending the day outside and the night indoors. By June the beans are
climbing their poles and the strawberries are ripening under nets to keep the blackbirds away.
July and August are for watering, weeding and picking. In September the apples fall and the
pumpkins turn orange. October is for clearing up, November for planning, and December for sitting
by the fire with a seed catalogue, dreaming of next year.""",
    """On Saturdays the square in front of the town hall fills with stalls. The fishmonger arrives
first, before dawn, with boxes of ice and the night's catch: mackerel, plaice, crabs and a few
lobsters that wave their claws at passing children. The cheese seller sets out wheels of hard
cheese and small soft rounds wrapped in leaves. There is a woman who sells honey from her own hives
and a man who sharpens knives while you wait. By nine o'clock the square is crowded. People argue
happily about prices, meet old friends, and carry home baskets heavy with vegetables. At one in the
afternoon the stalls begin to close, the pigeons move in to search for crumbs, and by three the
square is empty again, swept clean and quiet.""",
    """On a clear night far from the lights of any town, you can see about two thousand stars with
the naked eye. The brightest of them are not always the nearest; some are giants burning thousands
of times more fiercely than the Sun, so far away that their light has travelled for centuries to
reach us. The pale band of the Milky Way is the edge of our own galaxy, seen from the inside. The
planets do not twinkle as the stars do, because they show a tiny disc rather than a single point.
If you watch patiently you may see a satellite crossing the sky, a slow moving dot that fades as it
passes into the shadow of the Earth, or a meteor, a brief bright streak that is gone before you can
point it out to anyone else.""",
    """"How many sides does a hexagon have?" asked the teacher.
"Six," said Tom at once.
"And an octagon?"
"Eight."
"Good. Now, what is seven times eight?"
Tom hesitated. "Fifty-four?"
"Try again. Count up in sevens if it helps."
"Seven, fourteen, twenty-one, twenty-eight, thirty-five, forty-two, forty-nine, fifty-six. It's
fifty-six!"
"Exactly. There is no shame in counting, Tom. The people who get things right are usually the
ones who check their work, not the ones who answer fastest." She wrote 7 x 8 = 56 on the board and
underlined it twice. "Tomorrow we will look at fractions: halves, quarters and thirds. Bring your
rulers."
""",
    """The rules of the game are simple. Each player begins with five cards and three coins. On your
turn you may do one of three things: draw a card, play a card, or trade two cards for one coin. A
card that is played stays face up on the table until the end of the round. When the deck runs out,
the round ends and every player adds up the value of the cards in front of them. Red cards are
worth their number, blue cards are worth double, and black cards subtract from your score. The
player with the highest total wins the round and takes one coin from each other player. The first
person to collect ten coins wins the game. If two players tie, they each draw a single card, and the
higher card wins.""",
    """Ship's log, 14 June. Wind from the south-west, force four, backing west by evening. Sky
overcast, visibility good. Position at noon 51 degrees 12 minutes north, 9 degrees 40 minutes
west. Speed about six knots under full sail. Sighted a school of dolphins off the port bow at
three in the afternoon; they followed us for nearly an hour. The cook reports that the fresh water
is holding up well, though we will need to take on more within the week. One of the younger hands
has a cut on his left hand, cleaned and bandaged. At eight bells the watch changed without
incident. The barometer is falling slowly. I expect rain tomorrow and have ordered the hatches
checked and the loose gear on deck secured.""",
    """Tomorrow will start cloudy in most places, with patchy light rain in the north spreading
slowly south during the morning. It will brighten up from the west in the afternoon, with sunny
spells and just a few scattered showers, some of which could be heavy near the coast. Winds will
be moderate, fresh at times on high ground. Temperatures will reach around 16 degrees in the south
but only 11 or 12 degrees in the far north. Overnight, skies will clear and it will turn chilly,
with a touch of frost possible in sheltered valleys. The weekend looks mostly dry and settled, with
plenty of sunshine, although there is a chance of fog forming in the early mornings.""",
    """The old quarter of the city is a maze of narrow lanes that twist up the hill towards the
cathedral. Tall houses lean towards each other overhead, so close in places that neighbours could
almost shake hands from their windows. Ground floors are given over to small shops: a bookbinder, a
seller of maps and old prints, a café with three tables on the pavement, a tailor whose window has
not changed in forty years. At the top of the hill there is a terrace where you can look out over
the red roofs to the harbour and the hills beyond. In the evening the lanes fill with the sound of
conversation, the clatter of plates and, now and then, someone practising the violin badly but
with great determination.""",
    """A computer remembers things in several different ways, each with its own trade between speed
and size. The registers inside the processor are the fastest of all, but there are only a handful
of them. Next come the caches, small stores of recently used data that sit close to the processor
so that it does not have to wait. Main memory is much larger but slower, and a disk or a solid state
drive is larger and slower still. A well written program keeps the data it needs often close at
hand and reads large blocks at once rather than many tiny pieces. Much of the art of making
software fast lies not in doing less arithmetic but in moving less data, and in moving it at the
right moment.""",
    """The path to the summit leaves the road at a stone bridge and climbs steadily through pine
woods. After an hour the trees thin out, and the path crosses open slopes of heather and loose
scree. Here the wind can be strong, even on a fine day, and it is wise to carry an extra layer and
a waterproof coat. The last part of the climb follows a narrow ridge with steep drops on both
sides; it is not difficult, but it demands care, especially when the rock is wet. From the top, on
a clear day, you can see three lakes, the distant line of the sea, and the long blue shapes of
mountains in the next valley. Allow five hours for the round trip, and start early.""",
    """Honey bees live in colonies of many thousands of workers, a few hundred drones and a single
queen. The workers do everything: they clean the cells, feed the young, build comb from wax made in
their own bodies, guard the entrance and fly out to gather nectar and pollen. A worker that finds a
good patch of flowers returns to the hive and performs a dance on the comb. The direction of the
dance tells the other bees which way to fly, relative to the sun, and the length of the waggling
part tells them how far. In summer a worker lives for only about six weeks, and most of that short
life is spent working. Bees that hatch in autumn, however, may survive the whole winter.""",
    """Dear Sir or Madam,

I am writing to complain about the washing machine I bought from your shop on the second of
February. After only three weeks it began to leak from the bottom of the door, and on Friday it
flooded the kitchen floor. I telephoned your service line four times and was told on each occasion
that an engineer would call me back within two working days. Nobody has called. I would be grateful
if you could arrange either a repair or a replacement as soon as possible. I have kept the receipt,
the guarantee card and photographs of the damage, and I can send copies if required.

Yours faithfully,
J. Whitfield""",
    """If your bicycle chain keeps slipping, the first thing to check is whether it is clean and
properly oiled. Lift the back wheel, turn the pedals slowly, and watch the chain as it passes over
the teeth of the gears. A chain that is stiff in one place will jump. Wipe it with a rag, apply a
drop of oil to each link, and wipe off the extra oil so that it does not gather dirt. If the
slipping continues, the chain or the rear gears may be worn. A worn chain stretches slightly, and a
simple gauge will tell you whether it needs replacing. Finally, check that the gear cable is not
loose; a quarter turn of the adjuster is often all it takes to make the changes crisp again.""",
    """The dog had been missing for three days when the postman saw her sitting under a hedge on the
far side of the common, muddy and thin and very pleased with herself. He recognised her at once
from the posters on every lamp post in the village: a small brown terrier with one white ear and a
red collar. She would not come when he called, so he sat down on the grass and waited, and after a
while she trotted over and put her head on his knee. He carried her home in his post bag, which
she seemed to find entirely reasonable. The family cried, laughed, gave her a bath and a large
dinner, and the next morning there was a cake waiting for the postman on the doorstep.""",
    """A library is a quiet argument that knowledge belongs to everyone. Anyone may walk in, sit
down, and read a book that cost a week's wages when it was printed, or a newspaper from a hundred
years ago, or a map of a country that no longer exists. The librarian will help you find what you
are looking for, and often something better that you did not know you wanted. Children learn to
read there, students prepare for examinations, old men follow the football results, and people
without a computer at home come to write letters and search for work. A town without a library is
poorer in ways that are hard to measure but easy to feel.""",
    """The night train leaves the capital at eleven and arrives on the coast a little after seven
in the morning. The sleeping cars have narrow bunks with crisp white sheets, a small basin, and a
window blind that never quite closes. Most passengers fall asleep within an hour, lulled by the
rhythm of the wheels. Some lie awake and listen to the names of stations called out in the dark,
towns they will never visit, glimpsed only as a lit platform and a man with a lamp. In the morning
the attendant knocks with coffee and a bread roll, the blind goes up, and there is the sea, flat
and shining, as if it had been waiting all night for the train to arrive.""",
    """Winter came early that year. By the middle of November the pond was frozen hard enough to
skate on, and the first snow fell before the leaves had finished dropping from the beech trees. The
children built a snowman in the school yard and dressed him in a scarf and an old hat. The farmers
brought their cattle in from the fields and broke the ice on the water troughs each morning. At
night the stars were sharp and close, and the snow creaked underfoot. Old people said they had not
seen such a winter since they were young, which is what old people say every winter, but this time
it might have been true.""",
    """Good writing is mostly rewriting. The first draft of anything is a way of finding out what
you want to say; the second draft is for saying it clearly; the third is for cutting everything
that does not help. Read your work aloud. If you stumble over a sentence, so will your reader. Use
short words where they will do, and choose the concrete word over the abstract one: say "rain" if
you mean rain, not "adverse weather conditions". Cut adverbs that only repeat what the verb already
says. Above all, be patient with yourself. Nobody writes well at the first attempt, and the writers
who seem effortless are usually the ones who worked hardest.""",
    """The museum's new exhibition brings together more than two hundred objects from the ancient
world: coins, pottery, jewellery, tools, fragments of painted walls, and a small bronze horse no
bigger than a hand. Each object is displayed with a short label explaining where it was found and
what it was used for. In the central hall a large model shows a harbour town as it might have
looked two thousand years ago, with its warehouses, temples and crowded streets. Visitors can press
a button to hear the sounds of the port: gulls, ropes creaking, traders shouting their prices. The
exhibition is open every day except Monday, from ten until six, and entry is free for children.""",
    """Grandmother kept her buttons in an old biscuit tin with a picture of a castle on the lid.
When we were small and it rained, she would tip them out onto the kitchen table and let us sort
them: by colour, by size, by the number of holes. There were shiny brass buttons from a soldier's
coat, tiny pearl buttons from a christening gown, wooden toggles, and one enormous green button
that nobody could explain. She knew the story of almost every one. This one came from the dress
she wore to her sister's wedding; that one from a coat she had bought in 1962 and worn until it
fell apart. Sorting buttons, we learned the history of the family without ever being taught it.""",
    """Most accidents in the kitchen are caused by hurry. Keep knives sharp, because a blunt knife
needs more force and is more likely to slip. Turn pan handles inwards so that nobody knocks them as
they pass. Never leave hot oil unattended, and if a pan catches fire, turn off the heat and cover
it with a lid or a damp cloth; never throw water on burning fat. Wash your hands after handling raw
meat, and keep raw and cooked food apart. Store sharp tools out of the reach of children. None of
this is difficult, and none of it takes long, but together these small habits prevent most of the
cuts, burns and upset stomachs that send people to the doctor every year.""",
    """The village held its annual show on the last Saturday of August. There were prizes for the
longest runner bean, the heaviest marrow, the best jar of plum jam, and the most unusual shaped
vegetable, which that year went to a carrot with two legs and what looked like a nose. In the ring
there was a dog show, where a nervous spaniel won best in class and then refused to leave the
judge's side. Later came the tug of war between the two pubs, a race for the under-tens, and a
brass band that played slightly out of tune but with tremendous enthusiasm. Everyone agreed it was
the best show in years, which everyone agreed every year.""",
    """Questions people often ask: How long does delivery take? Orders placed before noon are
usually sent the same day and arrive within two to four working days. Can I change my order? Yes,
as long as it has not been sent; just reply to your confirmation email. What if something arrives
broken? Take a photograph, contact us within fourteen days, and we will send a replacement or a full
refund, whichever you prefer. Do you deliver abroad? We currently deliver to most countries in
Europe and to North America. Prices include tax, but customs charges may apply outside the EU. Is
my payment secure? All payments are handled by our bank, and we never see or store your card
details.""",
    """Salt was once so valuable that people fought wars over it, built roads to carry it, and paid
soldiers with it. Before refrigeration, salt was the main way to keep meat and fish from spoiling
through the winter. Cities grew rich on salt mines and salt marshes, and the word itself survives
in many expressions: a person may be worth their salt, or take a story with a pinch of it. Today
salt is cheap and easy to find, and the problem is usually that we eat too much rather than too
little. Yet it remains essential. The body cannot work without it, and a single teaspoon holds a
history longer than that of most nations.""",
    """He opened the door slowly. The room was exactly as he remembered it: the desk under the
window, the shelves of books with cracked spines, the armchair with the tartan rug folded over one
arm. Dust lay thick on everything, and the air smelled of paper and old tobacco. On the desk there
was a letter, still sealed, addressed to him in his father's careful handwriting. He stood looking
at it for a long time. Outside, a car passed, and somewhere a dog barked twice and fell silent. At
last he sat down in the chair, picked up the letter, and turned it over in his hands. Then, very
carefully, he opened it.""",
    """Zürich, São Paulo, Kraków, Reykjavík and Montréal are cities whose names keep their accents in
careful English writing, just as words such as café, naïve, façade, fiancée, résumé and déjà vu keep
theirs. Writers disagree about whether to use them; some think they are fussy, others think that
leaving them out is a small discourtesy. Typographers, meanwhile, argue about dashes — the short
one, the long one and the plain hyphen — and about whether quotation marks should be curly, “like
these”, or straight, "like these". The reader, happily, rarely notices either way.""",
    """Counting games help young children understand numbers long before they can write them. Ask a
child to count the stairs as you climb them: one, two, three, four, five. Lay out spoons for dinner
and ask how many more are needed if two friends are coming. Play shop with buttons as money, so
that a toy costs 3 buttons and a banana costs 2. Sort the washing into piles and compare them:
which pile has more socks? These small moments teach that numbers describe real things, that they
can be added and taken away, and that the same amount can be shown in many different ways. Later,
when the child meets 12 + 9 = 21 on a page, the idea will already feel familiar.""",
    """The meeting began at half past nine and ended, after two breaks for coffee, at a quarter to
one. There were seven items on the agenda. The treasurer reported that income for the year was up
by 8 per cent, mainly because of the summer fair, while costs had risen by only 3 per cent. The
committee agreed to repair the roof of the hall before the winter, to buy new chairs for the
children's room, and to look for a volunteer to run the website. A proposal to change the name of
the society was discussed at length and then postponed until the next meeting, which will be held
on the first Thursday of October at 7.30 in the evening.""",
    """People who keep chickens will tell you that each hen has her own character. One is bold and
follows you around the yard, hoping for a worm; another is shy and stays at the back of the run;
a third is a born escape artist who finds every gap in the fence. Hens like routine. They go to
bed at dusk without being told, climbing the ramp into the house one by one, and they complain
loudly if breakfast is late. A healthy hen lays an egg most days in spring and summer, fewer in the
autumn, and often none at all in the darkest weeks of winter, when she needs her strength to grow
new feathers.""",
    """It is easy to forget how recently most of the world lived by the light of the sun. Before gas
and electricity, an evening indoors meant candles, oil lamps or the glow of a fire. Work that
needed good light was done by day, and winter evenings were long, dark and often spent telling
stories. When the first electric street lamps were switched on, crowds gathered to stare at them,
and writers described the streets as being as bright as noon. Today the glow of our cities is
visible from space, and in many places it is impossible to see more than a few dozen stars. We have
gained the night for work and pleasure, and lost, perhaps, a little of our sense of wonder.""",
    """Please read these instructions before you use the kettle for the first time. Fill it with
water to at least the minimum mark, but never above the maximum mark. Place it firmly on its base
and switch it on at the wall. The light will come on, and the kettle will switch itself off when
the water boils. Do not open the lid while the water is boiling. To remove limescale, fill the
kettle half full with a mixture of equal parts water and white vinegar, leave it for an hour, then
empty it and boil fresh water twice before use. Never put the kettle in water or in a dishwasher.
Keep it out of the reach of small children.""",
    """The two brothers had not spoken for eleven years when the storm brought down the old elm that
stood on the boundary between their farms. It fell across the lane and blocked it completely, and
neither of them could reach the road. For a whole morning each worked alone with a saw on his own
side of the trunk. At noon they met in the middle. Neither said anything for a while. Then the
elder brother offered the younger his flask of tea, and the younger took it. They finished clearing
the lane together before dark, and in the spring, where the elm had stood, they planted a young oak
side by side.""",
    """Learning a new language as an adult is humbling. You stand in a shop and cannot ask for a
loaf of bread without rehearsing the sentence three times in your head, and then the shopkeeper
answers with a question you did not expect. You laugh at the wrong moments and miss the jokes. Yet
progress comes, slowly and then suddenly. One day you realise that you understood the whole of a
radio conversation, or that you dreamed in the new language, or that you made a joke and people
laughed for the right reason. Keep a notebook of words, speak even when you are afraid of mistakes,
and listen to everything: songs, news, children arguing in the park.""",
    """The recipe for the soup was written on a card in my mother's hand, stained with years of use.
Two onions, chopped. Three carrots. A stick of celery. A handful of red lentils, rinsed. Fry the
vegetables gently in butter until soft but not brown, about ten minutes. Add the lentils, a tin of
tomatoes and a litre and a half of stock. Simmer for forty minutes, stirring now and then. Season
with salt, pepper and a squeeze of lemon. At the bottom of the card, underlined, she had added:
"Better the next day." It always was. We ate it every Monday through the winter, and none of us
ever grew tired of it.""",
    """Scientists begin with a question and a guess. The guess is called a hypothesis, and the whole
point of it is that it might be wrong. An experiment is a fair test: you change one thing, keep
everything else the same, and measure what happens. If the results match what the hypothesis
predicted, it survives, at least for now; if they do not, it must be changed or thrown away. Good
scientists write down exactly what they did, so that others can repeat the experiment and see
whether they get the same answer. Knowledge built in this way is never quite finished, but it is
remarkably reliable, and it grows a little more certain each time it is tested.""",
    """The harbour wakes before the town. By five the fishing boats are coming in, low in the water,
surrounded by a cloud of gulls. Men in yellow oilskins swing crates onto the quay, and a forklift
truck hurries back and forth to the market shed, where the auction starts at six sharp. The
auctioneer speaks so fast that visitors cannot follow a single word, but the buyers, in white coats
and rubber boots, nod or raise a finger and the fish is sold in seconds. By eight it is all over.
The boats are hosed down, the nets hung to dry, and the crews walk up the hill to the café for
breakfast and sleep.""",
    """A good map is a remarkable piece of honesty. It shows you what is there, in the right place
and at the right size, and it tells you clearly what it has left out. The contour lines show the
shape of the ground: close together where the slope is steep, far apart where it is gentle. Blue
lines are streams, dotted black lines are footpaths, and small symbols mark churches, post offices,
viewpoints and public telephones. Learning to read a map is like learning to read a new alphabet.
At first each symbol must be looked up; later the whole landscape rises off the page, and you can
see the valley and the hill before you have ever set foot on them.""",
    """"Are you coming to the concert on Friday?" asked Priya.
"I would like to," said Sam, "but I have to work late. What time does it start?"
"Eight o'clock. We could meet at the station at half past seven."
"Let me see if I can swap my shift. Who is playing?"
"A string quartet from the conservatoire. Haydn, then something modern, then Schubert."
"Schubert? Then I will definitely try. I'll send you a message tomorrow morning."
"Perfect. And if you can't come, I'll tell you all about it, whether you like it or not."
Sam laughed. "That's a deal.\"""",
    """Every autumn the geese arrive from the north in long, ragged lines, calling to one another as
they fly. They come in thousands to the salt marsh, where they feed on the grass and rest through
the winter. At dawn they lift off the water together with a roar of wings and fly inland to the
fields; at dusk they return. People drive for hours to watch them, standing in the cold with
flasks of coffee and binoculars. Then, one morning in March, the marsh is quiet. The geese have
gone north again to breed, following routes their ancestors have flown for longer than anyone can
say, and the watchers go home to wait for October.""",
    """When you move into a new house, the first night always feels strange. The rooms echo, because
the furniture is not yet in its place and the curtains are not hung. You do not know which stair
creaks, where the light switches are, or how the boiler sounds when it starts in the morning. Boxes
stand everywhere, labelled in a hurry: kitchen, books, miscellaneous. You eat fish and chips on the
floor and go to bed early, exhausted. Then, slowly, over weeks and months, the house learns you and
you learn the house, until one evening you come home, drop your keys in the bowl by the door without
thinking, and realise that you are home.""",
    """Version 2.4 of the application fixes several bugs and adds a few small features. Files with
very long names can now be opened without an error. The search box remembers your last ten
searches. Printing is about twice as fast on most printers, and the preview now shows the correct
page numbers. We have also changed the default font size from 11 to 12 points, which many of you
asked for. Thank you to everyone who sent reports and suggestions; please keep them coming. If you
find a problem, include the version number, the steps that cause it, and what you expected to
happen instead. Screenshots are always welcome.""",
)


def corpus_text() -> str:
    """All passages joined by blank lines, exactly as they are embedded."""
    return "\n\n".join(PASSAGES)


def training_texts() -> list[str]:
    """The texts the tokenizer trainer sees: the prose, then deterministic variants of it.

    The prose alone yields a few thousand merges; the variants (capitalised and upper-case words,
    numbers written in digits) add the kinds of tokens a real vocabulary has, so that the learned
    vocabulary nearly fills the model's 8192 slots.
    """
    prose = corpus_text()
    words = prose.split()
    texts = [prose, prose.upper(), " ".join(w[:1].upper() + w[1:] for w in words)]
    texts.append(" ".join(str(n) for n in range(0, 2100)))
    texts.append(" ".join(f"{n / 100:.2f}" for n in range(0, 1000, 7)))
    return texts
